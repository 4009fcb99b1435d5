"""FakePropolis: a scriptable Propolis state stream, one per VMM, all in process.

The long-poll follows Propolis's semantics: ``state_monitor(gen)`` answers at once when
the fake's generation is at least ``gen``, and otherwise waits for the next change.
With ``auto=True`` (the default) requests behave like Propolis: ``Run`` walks Starting
-> Running, ``Stop`` walks Stopping -> Stopped -> Destroyed, ``Reboot`` Rebooting ->
Running. Tests script everything else: ``push``, ``halt`` (the guest powers off),
``fail``, ``disconnect``, ``error``, ``hang``, ``vanish``.

Live migration (``_migrate``): ensured with ``init: MigrationTarget`` it pulls its VM
from the source's Propolis (through the ``SourceLink`` its host gives it, ``attach``)
and both report the phases in their state monitors, as Propolis does; a stop queued on
a source waits for the migration, a state change on a target still migrating in is
Propolis's ``NoInstance`` (its VM is not active yet). ``hold(phase)`` stops either side
before a phase, ``migration_fail_at`` fails one, ``migration_phase_s`` makes each phase
take time, ``migration_idle_s`` is the source's wait for its target's next request.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

import attrs
import trio

from .._errors import PeerError, PropolisGone
from .._host import Zone
from .._wire import (
    InstanceEnsureRequest,
    InstanceMigrateStatusResponse,
    InstanceMigrationStatus,
    InstanceState,
    InstanceStateMonitorResponse,
    InstanceStateRequested,
)
from .._wire import PropolisMigrationState as Phase
from ._migrate import (
    CONSOLE_LINES,
    LocalNetwork,
    MigrationFailed,
    MigrationTargetInfo,
    SourceLink,
    run_migration_in,
)


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


class FakePropolis:
    def __init__(self, propolis_id: uuid.UUID | None, *, auto: bool = True) -> None:
        self.propolis_id = propolis_id
        self.auto = auto
        self.gen = 0
        self.state = InstanceState.CREATING
        self.migration = InstanceMigrateStatusResponse()
        self.ensured: InstanceEnsureRequest | None = None
        self.requests: list[InstanceStateRequested] = []
        #: trio time at which the VM reached Destroyed/Failed (halt_to_publish origin).
        self.halted_at: float | None = None
        self.monitor_delay_s = 0.0
        self.request_delay_s = 0.0
        #: Answer state requests late: after acting, let other tasks run (the monitor
        #: may see the VM halt) while the answer is already on its way (not cancellable),
        #: as when an HTTP response arrives in the same scheduler pass as the halt.
        self.answer_late = False
        self._changed = trio.Event()
        self._disconnected = False
        self._hung = False
        self._gone = False
        self._errors: list[PeerError] = []
        self._request_errors: list[PeerError] = []
        #: Answer the state monitor at once whatever generation is asked for (a mock, a
        #: buggy or restarted Propolis): the agent must not publish or spin on it.
        self.eager = False
        #: State-monitor answers given (to see that an eager one is polled with backoff).
        self.monitor_answers = 0
        #: The guest's serial console (COM1) history; it migrates with the guest.
        self.console: list[str] = []
        #: Set when ensured as a migration target.
        self.target: MigrationTargetInfo | None = None
        self._in_done = False
        self._out: _Outgoing | None = None
        #: Migration phases either side stops before, until released (``hold``).
        self.holds: set[Phase] = set()
        #: The phase this VM is held before, if it is.
        self.held_at: Phase | None = None
        self._hold_changed = trio.Event()
        #: Fail the migration at this phase (as a device that cannot export or import).
        self.migration_fail_at: Phase | None = None
        #: Seconds each phase takes on the source (RAM transfer time).
        self.migration_phase_s = 0.0
        #: A source fails its migration when its target has been silent this long.
        self.migration_idle_s = 10.0
        self._tasks: trio.Nursery | None = None
        self._links: Callable[[str], SourceLink] | None = None
        self._task_scopes: set[trio.CancelScope] = set()

    def attach(self, nursery: trio.Nursery, links: Callable[[str], SourceLink]) -> None:
        """Where this Propolis runs its migration tasks, and how it reaches a source."""
        self._tasks, self._links = nursery, links

    # --- scripting ----------------------------------------------------------------------

    def push(
        self, state: InstanceState, *, migration: InstanceMigrateStatusResponse | None = None
    ) -> None:
        """Move to ``state`` (generation + 1) and wake every waiting monitor."""
        self.gen += 1
        self.state = state
        if migration is not None:
            self.migration = migration
        if state in (InstanceState.DESTROYED, InstanceState.FAILED):
            if self.halted_at is None:
                self.halted_at = trio.current_time()
            self._out = None  # a migration out cannot go on
            if self.migrating_in:  # nor one in: its exchange stops
                self._in_done = True
                for scope in self._task_scopes:
                    scope.cancel()
        self._wake()

    def halt(self) -> None:
        """The guest powers off: Stopping -> Stopped -> Destroyed."""
        for state in (InstanceState.STOPPING, InstanceState.STOPPED, InstanceState.DESTROYED):
            self.push(state)

    def fail(self) -> None:
        self.push(InstanceState.FAILED)

    def disconnect(self, on: bool = True) -> None:
        """While on, every call fails as a refused connection (transient)."""
        self._disconnected = on
        self._wake()

    def error(self, status: int, code: str | None = None, *, times: int = 1) -> None:
        """The next ``times`` monitor calls answer ``status`` (410 = no VM)."""
        for _ in range(times):
            cls = PropolisGone if status == 410 or code == "NoInstance" else PeerError
            self._errors.append(cls(f"injected {status}", status=status, code=code))
        self._wake()

    def refuse_requests(
        self, status: int, code: str | None = None, *, message: str = "refused", times: int = 1
    ) -> None:
        """The next ``times`` state requests (``PUT /instance/state``) answer ``status``
        with Propolis's error body (``NoInstance``: the VM is not there)."""
        for _ in range(times):
            cls = PropolisGone if status == 410 or code == "NoInstance" else PeerError
            self._request_errors.append(
                cls(f"injected {status}", status=status, code=code, peer_message=message)
            )

    def hang(self, on: bool = True) -> None:
        """While on, monitor calls never answer."""
        self._hung = on
        self._wake()

    def vanish(self) -> None:
        """The process is gone: every call fails with ``PropolisGone``; its migration
        tasks stop (the other side finds it gone)."""
        self._gone = True
        self._out = None
        for scope in self._task_scopes:
            scope.cancel()
        self._wake()

    def write_console(self, line: str) -> None:
        """The guest writes a line on its serial console."""
        self.console.append(line)
        del self.console[:-CONSOLE_LINES]

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _check(self) -> None:
        if self._gone:
            raise PropolisGone("Propolis is gone", status=410, code="NoInstance")
        if self._disconnected:
            raise PeerError("connection refused (injected)")

    # --- PropolisClient -----------------------------------------------------------------

    async def ensure(self, request: InstanceEnsureRequest) -> None:
        """Create the VM, once; with ``init: MigrationTarget`` (``ValueError`` if it is
        malformed) it starts pulling the VM from its source."""
        if self.request_delay_s:
            await trio.sleep(self.request_delay_s)
        self._check()
        if self.ensured is not None:
            return
        info = MigrationTargetInfo.from_init(request.init)
        self.ensured = request
        if info is None:
            self.push(InstanceState.CREATING)
            return
        self.target = info
        self.push(InstanceState.MIGRATING)
        if self._tasks is None or self._links is None:
            self.migrate_in_failed(info, "no network to reach the source", started=False)
        else:
            self.spawn(run_migration_in, self, info, self._links(info.src_addr))

    def spawn(self, fn: Callable[..., object], *args: object) -> None:
        """Run a task of this Propolis: cancelled when it vanishes."""
        assert self._tasks is not None

        async def run() -> None:
            scope = trio.CancelScope()
            self._task_scopes.add(scope)
            try:
                with scope:
                    await fn(*args)  # type: ignore[misc]
            finally:
                self._task_scopes.discard(scope)

        self._tasks.start_soon(run)

    @property
    def migrating_in(self) -> bool:
        return self.target is not None and not self._in_done

    async def put_state(self, requested: InstanceStateRequested) -> None:
        if self.request_delay_s:
            await trio.sleep(self.request_delay_s)
        self._check()
        if self.ensured is None or self.migrating_in:
            raise _not_created()  # no active VM yet (a target is still migrating in)
        if self._request_errors:
            raise self._request_errors.pop(0)
        self.requests.append(requested)
        if not self.auto:
            return
        if self._out is not None:  # migrating out: Propolis's request queue rules
            if requested is InstanceStateRequested.STOP:
                self._out.stop_queued = True  # runs once the migration resolves
            elif requested is InstanceStateRequested.REBOOT:
                raise PeerError(
                    "instance state change not allowed: Operation cannot be performed on "
                    "a migration source",
                    status=403,
                    code=None,
                    peer_message="Operation cannot be performed on a migration source",
                )
            return
        if requested is InstanceStateRequested.RUN and self.state is not InstanceState.RUNNING:
            self.push(InstanceState.STARTING)
            self.push(InstanceState.RUNNING)
            self.write_console(f"[guest] booted (VM {self.ensured.properties.id})")
        elif requested is InstanceStateRequested.STOP:
            self.halt()
        elif requested is InstanceStateRequested.REBOOT:
            self.push(InstanceState.REBOOTING)
            self.push(InstanceState.RUNNING)
        if self.answer_late:
            for _ in range(3):
                await trio.lowlevel.cancel_shielded_checkpoint()

    async def state_monitor(self, gen: int) -> InstanceStateMonitorResponse:
        while True:
            self._check()
            if self._errors:
                raise self._errors.pop(0)
            if not self._hung and self.ensured is None:
                # Propolis's answer before a VM is created (424 FAILED_DEPENDENCY).
                raise PropolisGone(
                    "Server not initialized (no instance)", status=424, code="NoInstance"
                )
            if not self._hung and (self.gen >= gen or self.eager):
                break
            await self._changed.wait()
        if self.monitor_delay_s:
            await trio.sleep(self.monitor_delay_s)
        self.monitor_answers += 1
        return InstanceStateMonitorResponse(
            gen=self.gen, state=self.state, migration=self.migration
        )

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


class FakePropolisFleet:
    """A ``PropolisConnector``: one ``FakePropolis`` per VMM, made on first use.

    With ``run`` started (``open_fake_agent`` does) its VMs can migrate: each is reachable
    at its zone's ``propolis_addr`` on ``network`` (shared by the sleds of a two-sled
    harness), and its migration tasks run in the fleet's nursery."""

    def __init__(self, *, auto: bool = True, network: LocalNetwork | None = None) -> None:
        self.auto = auto
        self.by_id: dict[uuid.UUID | None, FakePropolis] = {}
        self.network = network if network is not None else LocalNetwork()
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for vm in self.by_id.values():
                vm.attach(nursery, self.network.link_for)
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    def __getitem__(self, propolis_id: uuid.UUID) -> FakePropolis:
        return self.by_id[propolis_id]

    def forget(self, zone: Zone) -> None:
        pass  # the fake keeps its VMs for the test to inspect

    def zone_halted(self, zone: Zone) -> None:
        """The zone is torn down: its Propolis dies with it."""
        vm = self.by_id.get(zone.propolis_id)
        if vm is not None:
            vm.vanish()
            self.network.remove(zone.propolis_addr, vm)

    def client_for(self, zone: Zone) -> FakePropolis:
        vm = self.by_id.get(zone.propolis_id)
        if vm is None:
            vm = self.by_id[zone.propolis_id] = FakePropolis(zone.propolis_id, auto=self.auto)
            if self._nursery is not None:
                vm.attach(self._nursery, self.network.link_for)
        self.network.add(zone.propolis_addr, vm)
        return vm
