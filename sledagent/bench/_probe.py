"""The benchmarks' state readers, in a process of their own (run this file by path).

A benchmark measures how the agent answers ``GET /vmms/{id}/state`` while it works. If
the readers run in the agent's process, each read's client CPU (an httpx exchange costs
about as much as the server side) lands on the agent's one trio thread and the figure
measures the client. So the readers run here, apart, with a lean client: one keep-alive
HTTP/1.1 connection per VMM (h11, as hypercorn parses it), reconnecting after a timeout.

Protocol on stdin/stdout (one line each): argv[1] is a JSON object
``{"api": url, "ids": [...], "interval_s": s, "timeout_s": s, "seed": n, "token": t}``;
the process connects every reader and prints ``ready``; on ``go`` each reader starts,
from a random offset within ``interval_s``, a read every ``interval_s``; on ``stop`` it
prints ``{"latencies_s": [...], "refused_latencies_s": [...], "timeouts": n, "errors": n,
"status": {code: n}}`` and exits (``refused_latencies_s``: the 503s' alone). With
``"count": n`` in the spec each reader makes n reads back to back and the result is
printed when all are done (``sledagent bench api``). ``errors``: connections that failed;
every answer, whatever its status, is timed.

Only the standard library, trio and h11: it starts in a fraction of a second.
"""

from __future__ import annotations

import json
import random
import sys
import time
from typing import Any
from urllib.parse import urlsplit

import h11
import trio


class _Conn:
    """One keep-alive HTTP/1.1 connection; ``get`` returns the status code."""

    def __init__(self, host: str, port: int, headers: list[tuple[str, str]]) -> None:
        self.host, self.port, self.headers = host, port, headers
        self.stream: trio.SocketStream | None = None
        self.h11 = h11.Connection(h11.CLIENT)

    async def close(self) -> None:
        if self.stream is not None:
            await self.stream.aclose()
        self.stream = None

    async def get(self, target: str) -> int:
        if self.stream is None or self.h11.our_state is not h11.IDLE:
            await self.close()
            self.stream = await trio.open_tcp_stream(self.host, self.port)
            self.h11 = h11.Connection(h11.CLIENT)
        conn = self.h11
        await self.stream.send_all(
            conn.send(h11.Request(method="GET", target=target, headers=self.headers))
            + conn.send(h11.EndOfMessage())
        )
        status = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await self.stream.receive_some(65536)
                if not data:
                    raise ConnectionError("server closed the connection")
                conn.receive_data(data)
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("server closed the connection")
        conn.start_next_cycle()
        return status


async def _reader(
    conn: _Conn, target: str, spec: dict[str, Any], go: trio.Event, out: dict[str, Any]
) -> None:
    interval, timeout = spec["interval_s"], spec["timeout_s"]
    offset = random.Random(f"{spec['seed']}{target}").uniform(0, interval)
    count = spec.get("count")  # a fixed number of reads, back to back (bench api)
    await go.wait()
    await trio.sleep(offset)
    while count is None or count > 0:
        count = None if count is None else count - 1
        t0 = time.monotonic()
        with trio.move_on_after(timeout) as scope:
            try:
                status = await conn.get(target)
            except (OSError, ConnectionError, h11.ProtocolError):
                out["errors"] += 1
                await conn.close()
            else:
                # 404 is an answer too: a VMM that was published is then removed; a 503
                # (the agent shedding reads) too, and its latency is also kept apart.
                took = time.monotonic() - t0
                out["latencies_s"].append(took)
                if status == 503:
                    out["refused_latencies_s"].append(took)
                out["status"][str(status)] = out["status"].get(str(status), 0) + 1
        if scope.cancelled_caught:
            out["timeouts"] += 1
            await conn.close()
        # Fixed period from the read's start, as a poller with a timer would.
        await trio.sleep(max(0.0, interval - (time.monotonic() - t0)))


async def _main(spec: dict[str, Any]) -> None:
    url = urlsplit(spec["api"])
    headers = [("host", url.netloc)]
    if spec.get("token"):
        headers.append(("authorization", f"Bearer {spec['token']}"))
    out: dict[str, Any] = {
        "latencies_s": [],
        "refused_latencies_s": [],
        "timeouts": 0,
        "errors": 0,
        "status": {},
    }
    go = trio.Event()
    stdin = trio.lowlevel.FdStream(0)
    async with trio.open_nursery() as nursery:
        conns = [_Conn(url.hostname or "127.0.0.1", url.port or 80, headers) for _ in spec["ids"]]
        for conn in conns:  # connect before "ready": the measurement has no handshakes
            conn.stream = await trio.open_tcp_stream(conn.host, conn.port)
        async with trio.open_nursery() as readers:
            for conn, vmm in zip(conns, spec["ids"], strict=True):
                readers.start_soon(_reader, conn, f"/vmms/{vmm}/state", spec, go, out)
            print("ready", flush=True)
            buf = b""
            while b"stop" not in buf:
                if b"go" in buf:
                    go.set()
                    if spec.get("count"):
                        break  # the readers end by themselves
                chunk = await stdin.receive_some()
                if not chunk:
                    break
                buf += chunk
            else:
                readers.cancel_scope.cancel()
        nursery.cancel_scope.cancel()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    trio.run(_main, json.loads(sys.argv[1]))
