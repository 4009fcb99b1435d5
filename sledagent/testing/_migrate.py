"""Simulated live migration: a target ``FakePropolis`` pulls its VM from a source's.

Propolis migrates over a websocket the target opens to the source
(``GET /instance/migrate/{migration_id}/start``), through phases in which both sides
publish their progress in their state monitors (``bin/propolis-server/src/lib/migrate/``):
the target reports ``migration_in`` Sync, RamPush, RamPushDirty, Device, RamPull,
Server, Finish and then runs; the source reports ``migration_out`` through the same
phases (plus Pause), hands the guest over and stops: Finish, then Stopping, Stopped,
Destroyed. Either side's failure is ``Error``: the target's VM fails, the source's
resumes Running. The Server phase carries the guest's serial console history (COM1),
which is how the guest's log carries over.

Here the exchange is a sequence of requests from the target to the source through a
``SourceLink``: ``LocalSourceLink`` calls the source ``FakePropolis`` in process (the
two-sled harness, ``LocalNetwork``); ``sledagent.sim``'s ``HttpSourceLink`` is a plain
HTTP exchange between two simulated Propolis servers, possibly in two processes.
``run_migration_in`` is the target's side; the source's is ``FakePropolis.migrate_out_*``.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import attrs
import trio

from .._errors import PeerError
from .._wire import PropolisMigrationState as Phase

if TYPE_CHECKING:
    from ._propolis import FakePropolis

T = TypeVar("T")

#: The phases the target asks the source for, in order (after ``start``, before
#: ``finish``), and what the target reports for each (``None``: the target has no such
#: phase; Propolis's destination has no explicit pause).
EXCHANGE: tuple[tuple[Phase, Phase | None], ...] = (
    (Phase.RAM_PUSH, Phase.RAM_PUSH),
    (Phase.PAUSE, None),
    (Phase.RAM_PUSH_DIRTY, Phase.RAM_PUSH_DIRTY),
    (Phase.DEVICE, Phase.DEVICE),
    (Phase.RAM_PULL, Phase.RAM_PULL),
    (Phase.SERVER, Phase.SERVER),
)

#: The guest's console history kept (lines), as Propolis's COM1 history buffer.
CONSOLE_LINES = 1000


class MigrationFailed(PeerError):
    """The exchange with the other side failed: unreachable, refused, or an error."""


@attrs.frozen
class MigrationTargetInfo:
    """``init: MigrationTarget`` of a ``PUT /instance`` (propolis-server contract)."""

    migration_id: uuid.UUID
    src_addr: str

    @classmethod
    def from_init(cls, init: Any) -> MigrationTargetInfo | None:
        """The target info of an ensure's ``init``, ``None`` for ``Spec``; ``ValueError``
        when it is malformed."""
        if not isinstance(init, dict) or init.get("method") != "MigrationTarget":
            return None
        value = init.get("value")
        if not isinstance(value, dict) or not isinstance(value.get("src_addr"), str):
            raise ValueError("init.value of MigrationTarget needs `migration_id` and `src_addr`")
        return cls(uuid.UUID(str(value.get("migration_id"))), value["src_addr"])


class SourceLink(Protocol):
    """The target's connection to its source; every call raises ``MigrationFailed``."""

    async def start(self, migration_id: uuid.UUID) -> None:
        """Open the migration: the source answered and is migrating out."""
        ...

    async def phase(self, migration_id: uuid.UUID, phase: Phase) -> list[str] | None:
        """Run one phase on the source; the Server phase answers the console history."""
        ...

    async def finish(self, migration_id: uuid.UUID) -> None:
        """Hand the guest over: the source publishes Finish and stops."""
        ...

    async def abort(self, migration_id: uuid.UUID, reason: str) -> None:
        """Tell the source the target failed (best effort)."""
        ...

    async def aclose(self) -> None: ...


async def run_migration_in(vm: FakePropolis, info: MigrationTargetInfo, link: SourceLink) -> None:
    """The target's side of one migration, run by its Propolis's task host until it
    ends (or the Propolis dies: cancelled). Holds (``vm.hold``) and injected failures
    (``vm.migration_fail_at``) apply before each step."""
    mid, started = info.migration_id, False
    try:
        await vm.gate(Phase.SYNC)
        await link.start(mid)
        started = True
        vm.migrate_in_phase(info, Phase.SYNC)
        for phase, ours in EXCHANGE:
            await vm.gate(phase)
            vm.check_injected(phase, "import")
            history = await link.phase(mid, phase)
            if history is not None:
                vm.import_console(history, info)
            if ours is not None:
                vm.migrate_in_phase(info, ours)
        await vm.gate(Phase.FINISH)
        vm.check_injected(Phase.FINISH, "import")
        await link.finish(mid)
        vm.migrate_in_finished(info)
    except PeerError as exc:
        vm.migrate_in_failed(info, str(exc), started=started)
        if started:
            with trio.move_on_after(5.0):
                try:
                    await link.abort(mid, str(exc))
                except PeerError:
                    pass  # the source may be the one that died
    finally:
        with trio.CancelScope(shield=True):
            await link.aclose()


class LocalNetwork:
    """Simulated Propolis servers in this process, by the address they listen at: a
    target finds its source here (``LocalSourceLink``)."""

    def __init__(self) -> None:
        self.by_addr: dict[str, FakePropolis] = {}

    def add(self, addr: str, vm: FakePropolis) -> None:
        self.by_addr[addr] = vm

    def remove(self, addr: str, vm: FakePropolis) -> None:
        if self.by_addr.get(addr) is vm:
            del self.by_addr[addr]

    def link_for(self, src_addr: str) -> LocalSourceLink:
        return LocalSourceLink(self, src_addr)


class LocalSourceLink:
    """A ``SourceLink`` to a ``FakePropolis`` of the same ``LocalNetwork``."""

    def __init__(self, network: LocalNetwork, src_addr: str) -> None:
        self._network = network
        self._addr = src_addr

    def _source(self) -> FakePropolis:
        vm = self._network.by_addr.get(self._addr)
        if vm is None:
            raise MigrationFailed(f"couldn't establish migration connection to {self._addr}")
        return vm

    async def start(self, migration_id: uuid.UUID) -> None:
        await self._call(self._source().migrate_out_start(migration_id))

    async def phase(self, migration_id: uuid.UUID, phase: Phase) -> list[str] | None:
        return await self._call(self._source().migrate_out_phase(migration_id, phase))

    async def finish(self, migration_id: uuid.UUID) -> None:
        source = self._source()
        try:
            source.migrate_out_finish(migration_id)
        except PeerError as exc:
            raise MigrationFailed(f"source: {exc}", status=exc.status) from exc
        source.migrated_out_stop()

    async def abort(self, migration_id: uuid.UUID, reason: str) -> None:
        vm = self._network.by_addr.get(self._addr)
        if vm is not None:
            vm.migrate_out_abort(migration_id, reason)
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()

    async def _call(self, call: Awaitable[T]) -> T:
        try:
            return await call
        except PeerError as exc:
            raise MigrationFailed(f"source: {exc}", status=exc.status) from exc
