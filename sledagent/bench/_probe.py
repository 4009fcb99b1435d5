"""The benchmarks' state readers, in a process of their own (run this file by path).

A benchmark measures how the agent answers ``GET /vmms/{id}/state`` while it works. If
the readers run in the agent's process, each read's client CPU (an httpx exchange costs
about as much as the server side) lands on the agent's one trio thread and the figure
measures the client. So the readers run here, apart, with a lean client: one keep-alive
HTTP/1.1 connection per VMM (the request pre-built, the answer parsed by hand), reconnecting
after a timeout. After a ``503`` with ``Retry-After`` a reader waits that long before its
next read (as a well-behaved client does), unless the spec says
``"honour_retry_after": false``.

One epoll loop, no trio (as the agent's front process, ``_front_loop``): on a real sled
the readers are other machines, and here every microsecond of their CPU is taken from
the 2 cores the agent runs on. Under trio they cost about as much CPU per read as the
front that answers them (docs/performance.md, "Session 11"); ``cpu_s`` in the result
says what they cost in this run.

Protocol on stdin/stdout (one line each): argv[1] is a JSON object
``{"api": url, "ids": [...], "interval_s": s, "timeout_s": s, "seed": n, "token": t}``;
the process connects every reader and prints ``ready``; on ``go`` each reader starts,
from a random offset within ``interval_s``, a read every ``interval_s``; on ``stop`` it
prints ``{"latencies_s": [...], "refused_latencies_s": [...], "timeouts": n, "errors": n,
"status": {code: n}, "own_lag_s": [...], "cpu_s": s}`` and exits (``refused_latencies_s``:
the 503s' alone; ``own_lag_s``: how late this process's own loop ran, sampled every
10 ms; ``cpu_s``: this process's CPU time from ``go``). With ``"count": n`` in the spec
each reader makes n reads back to back and the result is printed when all are done
(``sledagent bench api``). ``errors``: connections that failed; every answer, whatever
its status, is timed.

Only the standard library: it starts in a fraction of a second.
"""

from __future__ import annotations

import errno
import heapq
import json
import os
import random
import selectors
import socket
import sys
import time
from typing import Any
from urllib.parse import urlsplit

_READ, _WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
_LAG_EVERY_S = 0.01


class _Reader:
    """One VMM's poller: one keep-alive connection, one read in flight at most."""

    __slots__ = ("buf", "left", "request", "retry_after", "sent_at", "sock", "started")

    def __init__(self, request: bytes, count: int | None) -> None:
        self.request = request
        self.sock: socket.socket | None = None
        self.buf = b""
        #: When the read in flight started (monotonic), None between reads.
        self.started: float | None = None
        #: The request has been written (False: still connecting).
        self.sent_at = False
        self.retry_after = 0.0
        #: Reads left (``count``); None: until stopped.
        self.left = count


class Readers:
    def __init__(self, spec: dict[str, Any]) -> None:
        url = urlsplit(spec["api"])
        self.addr = (url.hostname or "127.0.0.1", url.port or 80)
        headers = f"host: {url.netloc}\r\n"
        if spec.get("token"):
            headers += f"authorization: Bearer {spec['token']}\r\n"
        self.interval, self.timeout = spec["interval_s"], spec["timeout_s"]
        self.honour = spec.get("honour_retry_after", True)
        self.count: int | None = spec.get("count")
        self.seed = spec["seed"]
        self.readers = [
            _Reader(f"GET /vmms/{vmm}/state HTTP/1.1\r\n{headers}\r\n".encode(), self.count)
            for vmm in spec["ids"]
        ]
        self.sel = selectors.DefaultSelector()
        #: (when, order, reader): reads due to start, and reads' deadlines.
        self.due: list[tuple[float, int, _Reader]] = []
        self.deadlines: list[tuple[float, int, _Reader]] = []
        self.order = 0
        self.active = len(self.readers)
        self.out: dict[str, Any] = {
            "latencies_s": [], "refused_latencies_s": [], "timeouts": 0, "errors": 0,
            "status": {}, "own_lag_s": [],
        }  # fmt: skip

    # --- connections ----------------------------------------------------------------------

    def connect_all(self) -> None:
        """Connect every reader before ``ready``: the measurement has no handshakes."""
        for reader in self.readers:
            sock = socket.create_connection(self.addr)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            reader.sock = sock
            self.sel.register(sock, _READ, reader)

    def _reconnect(self, reader: _Reader) -> None:
        sock = socket.socket(socket.AF_INET6 if ":" in self.addr[0] else socket.AF_INET)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        code = sock.connect_ex(self.addr)
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            raise OSError(code, "connect")
        reader.sock = sock
        self.sel.register(sock, _WRITE, reader)

    def _drop(self, reader: _Reader) -> None:
        if reader.sock is not None:
            self.sel.unregister(reader.sock)
            reader.sock.close()
            reader.sock = None
        reader.buf = b""

    # --- one read ----------------------------------------------------------------------------

    def _start(self, reader: _Reader, now: float) -> None:
        reader.started = now
        reader.sent_at = False
        self.order += 1
        heapq.heappush(self.deadlines, (now + self.timeout, self.order, reader))
        try:
            if reader.sock is None:
                self._reconnect(reader)  # the request goes once it is connected
                return
            self._send(reader)
        except OSError:
            self._failed(reader, now)

    def _send(self, reader: _Reader) -> None:
        assert reader.sock is not None
        reader.sock.send(reader.request)  # a few hundred bytes: the buffer takes them
        reader.sent_at = True

    def _writable(self, reader: _Reader, now: float) -> None:
        """A reconnect finished (or failed)."""
        assert reader.sock is not None
        if reader.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            self._failed(reader, now)
            return
        self.sel.modify(reader.sock, _READ, reader)
        try:
            self._send(reader)
        except OSError:
            self._failed(reader, now)

    def _readable(self, reader: _Reader, now: float) -> None:
        assert reader.sock is not None
        try:
            data = reader.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            if reader.started is not None:
                self._failed(reader, now)
            else:
                self._drop(reader)  # closed between reads: reconnect at the next
            return
        if reader.started is None:  # bytes nobody asked for
            self._failed(reader, now)
            return
        reader.buf += data
        buf = reader.buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = buf[:end].lower()
        fields: dict[bytes, bytes] = {}
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            fields[name] = value.strip()
        length = fields.get(b"content-length")
        if length is None:  # the agent always sends one
            self._failed(reader, now)
            return
        body = len(buf) - end - 4
        if body < int(length):
            return
        if body > int(length):  # bytes after the answer
            self._failed(reader, now)
            return
        status = int(head[9:12])
        took = now - reader.started
        out = self.out
        out["latencies_s"].append(took)
        if status == 503:
            out["refused_latencies_s"].append(took)
            reader.retry_after = float(fields.get(b"retry-after", b"0"))
        out["status"][str(status)] = out["status"].get(str(status), 0) + 1
        reader.buf = b""
        if fields.get(b"connection") == b"close":
            self._drop(reader)
        self._done(reader, now)

    def _failed(self, reader: _Reader, now: float, timeout: bool = False) -> None:
        self.out["timeouts" if timeout else "errors"] += 1
        self._drop(reader)
        self._done(reader, now)

    def _done(self, reader: _Reader, now: float) -> None:
        """The read ended: schedule the next one (fixed period from this one's start, as a
        poller with a timer would; after a 503 with Retry-After, no sooner than that)."""
        started, reader.started = reader.started, None
        assert started is not None
        if reader.left is not None:
            reader.left -= 1
            if reader.left <= 0:
                self.active -= 1
                return
        wait = self.interval - (now - started)
        if reader.retry_after and self.honour:
            wait = max(wait, reader.retry_after)
        reader.retry_after = 0.0
        self.order += 1
        heapq.heappush(self.due, (now + max(0.0, wait), self.order, reader))

    # --- the loop ----------------------------------------------------------------------------

    def run(self) -> None:
        """Read until ``stop`` on stdin (or, with a count, until every reader is done)."""
        now = time.monotonic()
        for reader in self.readers:
            offset = random.Random(f"{self.seed}{reader.request!r}").uniform(0, self.interval)
            self.order += 1
            heapq.heappush(self.due, (now + offset, self.order, reader))
        self.sel.register(0, _READ, None)
        lag_due = now + _LAG_EVERY_S
        lags = self.out["own_lag_s"]
        while self.count is None or self.active > 0:
            due = min(lag_due, self.due[0][0] if self.due else lag_due)
            if self.deadlines:
                due = min(due, self.deadlines[0][0])
            events = self.sel.select(max(0.0, due - time.monotonic()))
            now = time.monotonic()
            for key, mask in events:
                reader = key.data
                if reader is None:
                    return  # "stop", or the parent went away
                elif reader.sock is None or reader.sock.fileno() != key.fd:
                    continue  # dropped earlier in this batch
                elif mask & _WRITE:
                    self._writable(reader, now)
                else:
                    self._readable(reader, now)
            while self.deadlines and self.deadlines[0][0] <= now:
                _, _, reader = heapq.heappop(self.deadlines)
                if reader.started is not None and reader.started + self.timeout <= now:
                    self._failed(reader, now, timeout=True)
            while self.due and self.due[0][0] <= now:
                self._start(heapq.heappop(self.due)[2], now)
            if now >= lag_due:
                lags.append(now - lag_due)
                lag_due = now + _LAG_EVERY_S


def main(spec: dict[str, Any]) -> None:
    readers = Readers(spec)
    readers.connect_all()
    print("ready", flush=True)
    line = b""
    while not line.endswith(b"\n"):  # unbuffered: "stop" must wake the loop's epoll
        chunk = os.read(0, 64)
        if not chunk:
            break
        line += chunk
    cpu0 = time.process_time()
    if line.startswith(b"go"):
        readers.run()
    readers.out["cpu_s"] = round(time.process_time() - cpu0, 3)
    print(json.dumps(readers.out), flush=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
