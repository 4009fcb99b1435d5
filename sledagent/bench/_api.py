"""``sledagent bench api``: what one API request costs the agent's trio thread.

The agent (on the fake host, one running VMM) serves its API in this process; readers in
a process of their own (``_probe.py``: one keep-alive connection each, an epoll loop)
send ``GET /vmms/{id}/state`` back to back. Reported: the server's CPU per request (this
process's CPU time over the run, all threads, divided by the requests), requests per
second and latency; with ``--front process`` the reads go to a front process
(``_front_proc``) and its CPU per request is reported beside the agent's. It is the
figure that decides how many readers the agent serves while it also publishes halts:
docs/performance.md, "The API server's cost per request" and "Session 10".
"""

from __future__ import annotations

import os
import time
from functools import partial

import trio

from .._admission import ReadLimits
from .._api import build_app
from .._failures import UsageError
from .._front_channel import FrontSettings
from .._front_proc import FrontProcess
from .._http import HttpLimits
from .._server import bind_listeners, serve_api
from .._stats import summary
from ..testing import open_fake_agent
from ._wire import reader_process


async def run_api_bench(
    *, requests: int = 5000, connections: int = 50, front: str = "agent"
) -> dict[str, object]:
    """``front``: ``agent`` (the agent's loop serves) or ``process`` (the front
    process answers, ``_front_proc``; its CPU is reported apart)."""
    if requests < connections or connections < 1:
        raise UsageError("need requests >= connections >= 1")
    if front not in ("agent", "process"):
        raise UsageError("--front: agent or process")
    async with open_fake_agent() as harness:
        pid = await harness.start_vmm()
        shutdown = trio.Event()
        app = build_app(harness.agent)
        front_process = await FrontProcess.start() if front == "process" else None
        async with trio.open_nursery() as nursery:
            if front_process is None:
                urls = await nursery.start(
                    lambda task_status: serve_api(
                        app, listen="127.0.0.1:0", shutdown=shutdown, task_status=task_status
                    )
                )
            else:
                listeners, urls = await bind_listeners("127.0.0.1:0")
                settings = FrontSettings(limits=HttpLimits(), reads=ReadLimits())
                await nursery.start(
                    partial(front_process.serve, app, listeners, shutdown=shutdown,
                            registry=harness.agent.manager.registry, settings=settings)
                )  # fmt: skip
                await front_process.serving.wait()  # every read is the front's
            per_conn = requests // connections
            async with reader_process(
                urls[0], [pid] * connections, interval_s=0.0, timeout_s=10.0, count=per_conn
            ) as readers:
                front0, readers0 = _cpu_s(front_process), _cpu_s(readers.proc)
                cpu0, t0 = time.process_time(), time.monotonic()
                await readers.go()
                result = await readers.result()
                readers_cpu = _cpu_s(readers.proc) - readers0  # before it exits
                wall, cpu = time.monotonic() - t0, time.process_time() - cpu0
                front_cpu = _cpu_s(front_process) - front0
            shutdown.set()
    latencies: list[float] = result["latencies_s"]  # type: ignore[assignment]
    done = max(1, len(latencies))
    report: dict[str, object] = {
        "params": {"requests": per_conn * connections, "connections": connections,
                   "front": front},
        "answered": len(latencies),
        "errors": result["errors"],
        "timeouts": result["timeouts"],
        "wall_s": round(wall, 3),
        "requests_per_s": round(len(latencies) / wall, 1),
        "server_cpu_ms_per_request": round(cpu / done * 1e3, 3),
        "latency_s": summary(latencies),
        # the readers' own CPU (their process, on the same cores): not the server's
        "readers_cpu_ms_per_request": round(readers_cpu / done * 1e3, 3),
    }  # fmt: skip
    if front_process is not None:
        report["front_cpu_ms_per_request"] = round(front_cpu / done * 1e3, 3)
    return report


def _cpu_s(process: FrontProcess | trio.Process | None) -> float:
    """A process's CPU time so far (user + system, seconds; Linux ``/proc``)."""
    if process is None:
        return 0.0
    pid = process.process.pid if isinstance(process, FrontProcess) else process.pid
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
