"""The two sides of a live migration in ``FakePropolis`` (mixed into it).

The target's side is driven by ``run_migration_in`` (``_migrate``): it reports each
phase in its state monitor, takes over the guest's console in the Server phase, and
runs (Finish) or fails (Error). The source's side answers the target's steps through
its ``SourceLink``: it reports the same phases, hands the guest over and stops, or fails
and resumes (running on, or stopping if a stop was queued behind the migration); it
gives up on a target silent for ``migration_idle_s``. Either side stops before a phase
in ``holds`` and fails at ``migration_fail_at`` (docs/testing.md).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

import attrs
import trio

from .._errors import PeerError, PropolisGone
from .._wire import (
    InstanceEnsureRequest,
    InstanceMigrateStatusResponse,
    InstanceMigrationStatus,
    InstanceState,
)
from .._wire import PropolisMigrationState as Phase
from ._migrate import MigrationFailed, MigrationTargetInfo


@attrs.define
class _Outgoing:
    """A migration out in progress on a source."""

    migration_id: uuid.UUID
    last: float  # trio time of the target's last request
    busy: int = 0  # requests of the target being answered
    stop_queued: bool = False


def _not_created() -> PropolisGone:
    # Propolis's answer while it has no active VM (``not_created_error``: 424).
    return PropolisGone("Server not initialized (no instance)", status=424, code="NoInstance")


class MigrationSides:
    """Live migration for ``FakePropolis``; see the module doc."""

    state: InstanceState
    migration: InstanceMigrateStatusResponse
    ensured: InstanceEnsureRequest | None
    console: list[str]
    target: MigrationTargetInfo | None
    holds: set[Phase]
    held_at: Phase | None
    migration_fail_at: Phase | None
    migration_phase_s: float
    migration_idle_s: float
    _hold_changed: trio.Event
    _in_done: bool
    _out: _Outgoing | None
    _gone: bool
    _tasks: trio.Nursery | None

    def push(
        self, state: InstanceState, *, migration: InstanceMigrateStatusResponse | None = None
    ) -> None:
        raise NotImplementedError

    def halt(self) -> None:
        raise NotImplementedError

    def write_console(self, line: str) -> None:
        raise NotImplementedError

    def spawn(self, fn: Callable[..., object], *args: object) -> None:
        raise NotImplementedError

    def _check(self) -> None:
        raise NotImplementedError

    @property
    def migrating_in(self) -> bool:
        return self.target is not None and not self._in_done

    # --- live migration: both sides --------------------------------------------------

    def hold(self, phase: Phase, on: bool = True) -> None:
        """While on, this VM's side of a migration stops before ``phase``."""
        if on:
            self.holds.add(phase)
        else:
            self.holds.discard(phase)
        self._hold_changed.set()
        self._hold_changed = trio.Event()

    async def gate(self, phase: Phase) -> None:
        while phase in self.holds:
            self.held_at = phase
            self._hold_changed.set()  # wakes ``wait_held``
            self._hold_changed = trio.Event()
            await self._hold_changed.wait()
        self.held_at = None

    async def wait_held(self, phase: Phase) -> None:
        """Wait until this VM's migration is held before ``phase``."""
        while self.held_at is not phase:
            await self._hold_changed.wait()

    def check_injected(self, phase: Phase, what: str) -> None:
        if self.migration_fail_at is phase:
            raise MigrationFailed(f"failed to {what} state at {phase.value} (injected)")

    def _set_migration(
        self, out: bool, migration_id: uuid.UUID, phase: Phase, state: InstanceState
    ) -> None:
        status = InstanceMigrationStatus(migration_id, phase)
        mig = self.migration
        self.migration = (
            attrs.evolve(mig, migration_out=status)
            if out
            else attrs.evolve(mig, migration_in=status)
        )
        self.push(state)

    # --- the target's side (driven by ``run_migration_in``) ---------------------------

    def migrate_in_phase(self, info: MigrationTargetInfo, phase: Phase) -> None:
        self._set_migration(False, info.migration_id, phase, InstanceState.MIGRATING)

    def import_console(self, history: list[str], info: MigrationTargetInfo) -> None:
        self.console = list(history)
        self.write_console(f"[propolis] migrated in ({info.migration_id})")

    def migrate_in_finished(self, info: MigrationTargetInfo) -> None:
        self._in_done = True
        self._set_migration(False, info.migration_id, Phase.FINISH, InstanceState.RUNNING)

    def migrate_in_failed(self, info: MigrationTargetInfo, reason: str, *, started: bool) -> None:
        """The migration in failed: the target's VM fails (``Error`` once it had begun;
        before, Propolis's ensure fails with no migration status)."""
        if self._gone:
            return
        self._in_done = True
        self.write_console(f"[propolis] migration in failed: {reason}")
        if started:
            self._set_migration(False, info.migration_id, Phase.ERROR, InstanceState.FAILED)
        else:
            self.push(InstanceState.FAILED)

    # --- the source's side (called by the target through its link) --------------------

    async def migrate_out_start(self, migration_id: uuid.UUID) -> None:
        """A target opens a migration from this VM: it must be running, with no stop
        pending and no other migration (Propolis's ``request_queue`` rules)."""
        await self.gate(Phase.SYNC)
        self._check()
        if self.ensured is None or self.migrating_in:
            raise _not_created()
        if self._out is not None:
            raise PeerError(
                "a migration from the current instance is already in progress", status=409
            )
        if self.state is not InstanceState.RUNNING:
            raise PeerError(f"instance is {self.state.value}, not running", status=403)
        out = self._out = _Outgoing(migration_id, trio.current_time())
        self._set_migration(True, migration_id, Phase.SYNC, InstanceState.MIGRATING)
        if self._tasks is not None:
            self.spawn(self._watch_target, out)

    def _outgoing(self, migration_id: uuid.UUID) -> _Outgoing:
        self._check()
        if self._out is None:
            raise PeerError("no migration is currently in progress", status=409)
        if self._out.migration_id != migration_id:
            raise PeerError("unexpected Uuid", status=403)
        return self._out

    async def migrate_out_phase(self, migration_id: uuid.UUID, phase: Phase) -> list[str] | None:
        """Run ``phase`` for the target; the Server phase answers the console history."""
        out = self._outgoing(migration_id)
        out.busy += 1
        try:
            await self.gate(phase)
            if self.migration_phase_s:
                await trio.sleep(self.migration_phase_s)
            out = self._outgoing(migration_id)
            if self.migration_fail_at is phase:
                self._abort_out(f"failed to export state at {phase.value} (injected)")
                raise PeerError(f"migration failed at {phase.value} (injected)", status=500)
            self._set_migration(True, migration_id, phase, InstanceState.MIGRATING)
            return list(self.console) if phase is Phase.SERVER else None
        finally:
            out.busy -= 1
            out.last = trio.current_time()

    def migrate_out_finish(self, migration_id: uuid.UUID) -> None:
        """The target is ready to run the guest: hand it over (Finish). The caller then
        stops this VM (``migrated_out_stop``), once its answer is on its way."""
        self._outgoing(migration_id)
        self._out = None
        self.write_console(f"[propolis] migrated out ({migration_id})")
        self._set_migration(True, migration_id, Phase.FINISH, InstanceState.MIGRATING)

    def migrated_out_stop(self) -> None:
        """After a migration out the source's VM stops (Finish stays reported)."""
        if not self._gone and self.state not in (InstanceState.DESTROYED, InstanceState.FAILED):
            self.halt()

    def migrate_out_abort(self, migration_id: uuid.UUID, reason: str) -> None:
        if self._out is not None and self._out.migration_id == migration_id:
            self._abort_out(reason)

    def _abort_out(self, reason: str) -> None:
        """The migration out failed: Error, and the VM resumes (or stops, if a stop was
        queued behind the migration)."""
        out, self._out = self._out, None
        if out is None or self._gone:
            return
        self.write_console(f"[propolis] migration out failed: {reason}")
        self._set_migration(True, out.migration_id, Phase.ERROR, InstanceState.RUNNING)
        if out.stop_queued:
            self.halt()

    async def _watch_target(self, out: _Outgoing) -> None:
        """Fail the migration out once the target has been silent ``migration_idle_s``
        (Propolis's websocket tells it at once that the target died; see design.md)."""
        while self._out is out:
            remaining = out.last + self.migration_idle_s - trio.current_time()
            if remaining > 0:
                await trio.sleep(remaining)
            elif out.busy:
                out.last = trio.current_time()  # answering it: not silent
            else:
                self._abort_out(f"the target was silent for {self.migration_idle_s:g} s")
