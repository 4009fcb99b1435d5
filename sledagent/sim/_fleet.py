"""SimPropolisFleet: one simulated Propolis server per zone, all in one process.

Who starts it: the daemon, in its nursery, before the agent. The local zone backend
calls ``launch`` when it installs a zone (the zone's ``propolis_addr`` becomes the bound
loopback address) and ``retire`` when it halts the zone, which stops that server (the VM
is gone: a state monitor still waiting sees the connection close). Each server listens
on 127.0.0.1:0 with its own ``FakePropolis`` state machine and, when the zone asks for
it, writes the zone's Propolis log (one ``SimLogWriter`` for the whole fleet).
"""

from __future__ import annotations

from pathlib import Path

import attrs
import trio

from .._local_zones import LogSpec
from .._logwriter import SERVICE_LOG
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
    def __init__(self, *, log_interval_s: float = 0.5) -> None:
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
        Propolis does in its zone) when that can be bound here, else on an ephemeral
        loopback port. With ``logs`` it writes the zone's Propolis log until retired."""
        if zone_name in self._running:
            return self._running[zone_name].addr
        if self._nursery is None:
            raise RuntimeError("SimPropolisFleet.launch() before run() started")
        vm = FakePropolis(None)
        binds: list[str] | None = None
        if addr:
            try:
                stop, scope = trio.Event(), trio.CancelScope()
                binds = await self._nursery.start(self._serve, vm, stop, scope, addr)
            except* (OSError, ValueError):
                binds = None  # taken, or not an address of this host
        if binds is None:
            stop, scope = trio.Event(), trio.CancelScope()
            binds = await self._nursery.start(self._serve, vm, stop, scope, "127.0.0.1:0")
        addr = str(binds[0]).removeprefix("http://")
        self._running[zone_name] = _Running(vm, addr, stop, scope)
        if logs is not None:
            # The log exists once the Propolis does (the writer's first lines may be a
            # tick away), as a real Propolis opens its log at start.
            await trio.to_thread.run_sync(_touch, logs.log_dir / SERVICE_LOG)
            self.logs.add(zone_name, logs)
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
                    await serve_api(app, listen=listen, shutdown=stop, task_status=task_status)
                    nursery.cancel_scope.cancel()

                task_status.started(await nursery.start(serve))

    def vm(self, zone_name: str) -> FakePropolis | None:
        """The state machine behind a zone's Propolis (to act as its guest)."""
        running = self._running.get(zone_name)
        return None if running is None else running.vm


def _touch(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    except OSError:
        pass  # the zone is going away already
