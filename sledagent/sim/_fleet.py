"""SimPropolisFleet: one simulated Propolis server per zone, all in one process.

Who starts it: the daemon, in its nursery, before the agent. The local zone backend
calls ``launch`` when it installs a zone (the zone's ``propolis_addr`` becomes the bound
loopback address) and ``retire`` when it halts the zone, which stops that server (the VM
is gone: a state monitor still waiting sees the connection close). Each server listens
on ``listen`` (default 127.0.0.1:0, any free port; with a port P, the first free port
from P up, for hosts where only a range is open) with its own ``FakePropolis`` state
machine and, when the zone asks for it, writes the zone's Propolis log (one
``SimLogWriter`` for the whole fleet).
"""

from __future__ import annotations

import errno
from typing import Any

import attrs
import trio

from .._addr import parse_listen
from .._local_zones import LogSpec
from .._server import serve_api
from ..testing._propolis import FakePropolis
from ._logs import SimLogWriter
from ._migrate import HttpSourceLink
from ._propolis import sim_propolis_app


@attrs.define
class _Running:
    vm: FakePropolis
    addr: str
    stop: trio.Event
    scope: trio.CancelScope


class SimPropolisFleet:
    def __init__(self, *, log_interval_s: float = 0.5, listen: str = "127.0.0.1:0") -> None:
        host, self._first_port = parse_listen(listen)
        self._next_port = self._first_port
        self._host = "" if host is None else f"[{host}]" if ":" in host else host
        self._nursery: trio.Nursery | None = None
        self._running: dict[str, _Running] = {}
        self.logs = SimLogWriter(interval_s=log_interval_s)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.logs.run)
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def __len__(self) -> int:
        return len(self._running)

    async def launch(
        self, zone_name: str, logs: LogSpec | None = None, *, addr: str | None = None
    ) -> str:
        """Start the zone's Propolis; returns its ``host:port``. Idempotent.

        It listens at ``addr`` (the ``propolis_addr`` Nexus registered, as a real
        Propolis does in its zone) when that can be bound here, else on the fleet's
        ``listen`` (any free loopback port by default). With ``logs`` it writes the
        zone's Propolis log until retired."""
        if zone_name in self._running:
            return self._running[zone_name].addr
        if self._nursery is None:
            raise RuntimeError("SimPropolisFleet.launch() before run() started")
        vm, stop = FakePropolis(None), trio.Event()
        binds: Any = None
        if addr and not addr.endswith(":0"):  # port 0 names no address: use ``listen``
            scope = trio.CancelScope()
            try:
                binds = await self._nursery.start(self._serve, vm, stop, scope, addr)
            except* (OSError, ValueError):
                binds = None  # taken, or not an address of this host
        if binds is None:
            binds, scope = await self._start(vm, stop)
        addr = str(binds[0]).removeprefix("http://")
        running = _Running(vm, addr, stop, scope)
        self._running[zone_name] = running
        if logs is not None:
            await self.logs.start(zone_name, logs)  # the log exists once launched
            if self._running.get(zone_name) is not running:  # retired meanwhile
                self.logs.remove(zone_name)
        return addr

    async def retire(self, zone_name: str) -> None:
        """Stop the zone's Propolis; idempotent. Returns once its log gets no more
        writes (the zone's directory is removed next)."""
        self.retire_now(zone_name)
        await self.logs.settled()

    def retire_now(self, zone_name: str) -> None:
        """``retire``, synchronously."""
        running = self._running.pop(zone_name, None)
        self.logs.remove(zone_name)
        if running is not None:
            running.vm.vanish()  # a waiting long poll answers "no instance" at once
            running.stop.set()

    def kill(self, zone_name: str) -> None:
        """The zone's Propolis process dies: its connections close unanswered and its
        port refuses connections; the zone itself stays. Idempotent."""
        running = self._running.pop(zone_name, None)
        self.logs.remove(zone_name)
        if running is not None:
            running.scope.cancel()

    async def _start(self, vm: FakePropolis, stop: trio.Event) -> tuple[Any, trio.CancelScope]:
        """Serve ``vm``; its bound URLs and the scope that kills its server."""
        assert self._nursery is not None
        if self._first_port == 0:
            scope = trio.CancelScope()
            listen = f"{self._host}:0"
            return await self._nursery.start(self._serve, vm, stop, scope, listen), scope
        # The first free port from P up, starting after the last one taken (retired
        # zones' ports come round again), so N launches do not try N ports each.
        start = self._next_port
        for port in [*range(start, 65536), *range(self._first_port, start)]:
            listen, scope = f"{self._host}:{port}", trio.CancelScope()  # one per attempt
            taken = False
            try:
                binds = await self._nursery.start(self._serve, vm, stop, scope, listen)
            except* OSError as group:  # (raised through the server's own nursery)
                if any(e.errno != errno.EADDRINUSE for e in _oserrors(group)):
                    raise
                taken = True
            if taken:
                continue
            self._next_port = port + 1 if port < 65535 else self._first_port
            return binds, scope
        raise OSError(errno.EADDRINUSE, f"no free port from {self._first_port} up")

    async def _serve(
        self,
        vm: FakePropolis,
        stop: trio.Event,
        scope: trio.CancelScope,
        listen: str,
        *,
        task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        # The server and the VM's migration tasks end together (``kill``: as a process).
        with scope:
            async with trio.open_nursery() as nursery:
                vm.attach(nursery, HttpSourceLink)

                async def serve(*, task_status: trio.TaskStatus[list[str]]) -> None:
                    app = sim_propolis_app(vm)
                    await serve_api(
                        app,
                        listen=listen,
                        shutdown=stop,
                        announce=False,  # one per zone: not worth a log line each
                        task_status=task_status,
                    )
                    nursery.cancel_scope.cancel()

                task_status.started(await nursery.start(serve))

    def addresses(self) -> dict[str, str]:
        """Each running zone's Propolis address (``host:port``)."""
        return {name: running.addr for name, running in self._running.items()}

    def vm(self, zone_name: str) -> FakePropolis | None:
        """The state machine behind a zone's Propolis (to act as its guest)."""
        running = self._running.get(zone_name)
        return None if running is None else running.vm


def _oserrors(group: BaseExceptionGroup[OSError]) -> list[OSError]:
    found: list[OSError] = []
    for exc in group.exceptions:
        found += _oserrors(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return found
