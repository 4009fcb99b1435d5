"""The benchmarks' state readers, in a process of their own (run this file by path).

A benchmark measures how the agent answers ``GET /vmms/{id}/state`` while it works. If
the readers run in the agent's process, each read's client CPU (an httpx exchange costs
about as much as the server side) lands on the agent's one trio thread and the figure
measures the client. So the readers run here, apart, with a lean client: one keep-alive
HTTP/1.1 connection per VMM (the request pre-built, the answer parsed by hand), reconnecting
after a timeout. After a ``503`` with ``Retry-After`` a reader waits that long before its
next read (as a well-behaved client does), unless the spec says
``"honour_retry_after": false``.

Protocol on stdin/stdout (one line each): argv[1] is a JSON object
``{"api": url, "ids": [...], "interval_s": s, "timeout_s": s, "seed": n, "token": t}``;
the process connects every reader and prints ``ready``; on ``go`` each reader starts,
from a random offset within ``interval_s``, a read every ``interval_s``; on ``stop`` it
prints ``{"latencies_s": [...], "refused_latencies_s": [...], "timeouts": n, "errors": n,
"status": {code: n}, "own_lag_s": [...]}`` and exits (``refused_latencies_s``: the 503s'
alone; ``own_lag_s``: how late this process's own loop ran, sampled every 10 ms). With
``"count": n`` in the spec each reader makes n reads back to back and the result is
printed when all are done (``sledagent bench api``). ``errors``: connections that failed;
every answer, whatever its status, is timed.

Only the standard library and trio: it starts in a fraction of a second.
"""

from __future__ import annotations

import json
import random
import sys
import time
from typing import Any
from urllib.parse import urlsplit

import trio


class _Conn:
    """One keep-alive HTTP/1.1 connection; ``get`` returns the status code and the
    ``Retry-After`` seconds of a 503 (0 if none).

    The request is written once as bytes and the answer read by hand (status line,
    ``content-length``, body): on a real sled the readers are other machines, and here
    every microsecond of the readers' CPU is taken from the 2 cores the agent runs on.
    An answer without ``content-length`` (the agent always sends one) is an error."""

    def __init__(self, host: str, port: int, headers: list[tuple[str, str]]) -> None:
        self.host, self.port, self.headers = host, port, headers
        self.stream: trio.SocketStream | None = None
        self._requests: dict[str, bytes] = {}

    async def close(self) -> None:
        if self.stream is not None:
            await self.stream.aclose()
        self.stream = None

    async def get(self, target: str) -> tuple[int, float]:
        request = self._requests.get(target)
        if request is None:
            fields_out = "".join(f"{k}: {v}\r\n" for k, v in self.headers)
            request = f"GET {target} HTTP/1.1\r\n{fields_out}\r\n".encode()
            self._requests[target] = request
        if self.stream is None:
            self.stream = await trio.open_tcp_stream(self.host, self.port)
        stream = self.stream
        await stream.send_all(request)
        buf = b""
        while (end := buf.find(b"\r\n\r\n")) < 0:
            data = await stream.receive_some(65536)
            if not data:
                raise ConnectionError("server closed the connection")
            buf += data
        head = buf[:end].lower()
        status = int(head[9:12])
        fields: dict[bytes, bytes] = {}
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            fields[name] = value.strip()
        if b"content-length" not in fields:
            raise ConnectionError("an answer without content-length")
        length = int(fields[b"content-length"])
        body = len(buf) - end - 4
        while body < length:
            data = await stream.receive_some(65536)
            if not data:
                raise ConnectionError("server closed the connection")
            body += len(data)
        if body > length:
            raise ConnectionError("bytes after the answer")
        if fields.get(b"connection") == b"close":
            await self.close()
        retry_after = float(fields.get(b"retry-after", b"0")) if status == 503 else 0.0
        return status, retry_after


async def _reader(
    conn: _Conn, target: str, spec: dict[str, Any], go: trio.Event, out: dict[str, Any]
) -> None:
    interval, timeout = spec["interval_s"], spec["timeout_s"]
    offset = random.Random(f"{spec['seed']}{target}").uniform(0, interval)
    count = spec.get("count")  # a fixed number of reads, back to back (bench api)
    retry_after = 0.0
    await go.wait()
    await trio.sleep(offset)
    while count is None or count > 0:
        count = None if count is None else count - 1
        t0 = time.monotonic()
        with trio.move_on_after(timeout) as scope:
            try:
                status, retry_after = await conn.get(target)
            except (OSError, ConnectionError, ValueError):
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
        # Fixed period from the read's start, as a poller with a timer would; after a 503
        # with Retry-After, no sooner than that (a well-behaved client; "honour_retry_after").
        wait = interval - (time.monotonic() - t0)
        if retry_after and spec.get("honour_retry_after", True):
            wait = max(wait, retry_after)
            retry_after = 0.0
        await trio.sleep(max(0.0, wait))


async def _own_lag(go: trio.Event, out: dict[str, Any]) -> None:
    """How late this process's own loop runs (a 10 ms sleep's overshoot, seconds): a
    latency the readers report includes it, and it is not the agent's."""
    lags: list[float] = out.setdefault("own_lag_s", [])
    await go.wait()
    while True:
        t0 = time.monotonic()
        await trio.sleep(0.01)
        lags.append(time.monotonic() - t0 - 0.01)


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
        nursery.start_soon(_own_lag, go, out)  # cancelled with the outer nursery
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
