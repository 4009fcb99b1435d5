"""``sledagent bench api``: what one API request costs the agent's trio thread.

The agent (on the fake host, one running VMM) serves its API in this process; readers in
a process of their own (``_probe.py``: one keep-alive connection each, lean h11 client)
send ``GET /vmms/{id}/state`` back to back. Reported: the server's CPU per request (this
process's CPU time over the run, all threads, divided by the requests), requests per
second and latency. It is the figure that decides how many readers the agent serves
while it also publishes halts: docs/performance.md, "The API server's cost per request".
"""

from __future__ import annotations

import time

import trio

from .._api import build_app
from .._failures import UsageError
from .._server import serve_api
from .._stats import summary
from ..testing import open_fake_agent
from ._wire import reader_process


async def run_api_bench(*, requests: int = 5000, connections: int = 50) -> dict[str, object]:
    if requests < connections or connections < 1:
        raise UsageError("need requests >= connections >= 1")
    async with open_fake_agent() as harness:
        pid = await harness.start_vmm()
        shutdown = trio.Event()
        async with trio.open_nursery() as nursery:
            urls = await nursery.start(
                lambda task_status: serve_api(
                    build_app(harness.agent),
                    listen="127.0.0.1:0",
                    shutdown=shutdown,
                    task_status=task_status,
                )
            )
            per_conn = requests // connections
            async with reader_process(
                urls[0], [pid] * connections, interval_s=0.0, timeout_s=10.0, count=per_conn
            ) as readers:
                cpu0, t0 = time.process_time(), time.monotonic()
                await readers.go()
                result = await readers.result()
                wall, cpu = time.monotonic() - t0, time.process_time() - cpu0
            shutdown.set()
    latencies: list[float] = result["latencies_s"]  # type: ignore[assignment]
    done = len(latencies)
    return {
        "params": {"requests": per_conn * connections, "connections": connections},
        "answered": done,
        "errors": result["errors"],
        "timeouts": result["timeouts"],
        "wall_s": round(wall, 3),
        "requests_per_s": round(done / wall, 1),
        "server_cpu_ms_per_request": round(cpu / max(1, done) * 1e3, 3),
        "latency_s": summary(latencies),
    }
