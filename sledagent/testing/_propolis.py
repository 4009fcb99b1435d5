"""FakePropolis: a scriptable Propolis state stream, one per VMM, all in process.

The long-poll follows Propolis's semantics: ``state_monitor(gen)`` answers at once when
the fake's generation is at least ``gen``, and otherwise waits for the next change.
With ``auto=True`` (the default) requests behave like Propolis: ``Run`` walks Starting
-> Running, ``Stop`` walks Stopping -> Stopped -> Destroyed, ``Reboot`` Rebooting ->
Running. Tests script everything else: ``push``, ``halt`` (the guest powers off),
``fail``, ``disconnect``, ``error`` (the state monitor's answers), ``refuse`` (the
requests'), ``hang``, ``vanish``.

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

import structlog
import trio

from .._errors import PeerError, PropolisGone
from .._host import Zone
from .._wire import (
    InstanceEnsureRequest,
    InstanceGetResponse,
    InstanceMigrateStatusResponse,
    InstanceState,
    InstanceStateMonitorResponse,
    InstanceStateRequested,
    PropolisInstance,
)
from .._wire import PropolisMigrationState as Phase
from ._migrate import (
    CONSOLE_LINES,
    LocalNetwork,
    MigrationTargetInfo,
    SourceLink,
    run_migration_in,
)
from ._migration_sides import MigrationSides, _not_created, _Outgoing

log = structlog.get_logger("sledagent.sim")


class FakePropolis(MigrationSides):
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
        #: Answer the state monitor at once at the generation asked for, with nothing
        #: else changed (a Propolis that advances its generation on every answer).
        self.restless = False
        #: State-monitor answers given (to see that an eager one is polled with backoff).
        self.monitor_answers = 0
        self._refusals: list[PeerError] = []
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

    def refuse(self, status: int, code: str | None = None, *, times: int = 1) -> None:
        """The next ``times`` requests (``PUT /instance``, ``PUT /instance/state``)
        answer ``status``: Propolis refusing the VM or a state change."""
        for _ in range(times):
            cls = PropolisGone if status == 410 or code == "NoInstance" else PeerError
            refusal = cls(f"refused with {status} (injected)", status=status, code=code)
            self._refusals.append(refusal)

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
        if self._refusals:
            raise self._refusals.pop(0)
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
            except Exception:  # a bug here must not take the other VMs' host down
                log.exception("propolis_task_failed", propolis_id=str(self.propolis_id))
            finally:
                self._task_scopes.discard(scope)

        self._tasks.start_soon(run)

    async def instance(self) -> InstanceGetResponse:
        if self.request_delay_s:
            await trio.sleep(self.request_delay_s)
        self._check()
        if self._hung:
            await trio.sleep_forever()
        if self.ensured is None:
            raise PropolisGone(
                "Server not initialized (no instance)", status=424, code="NoInstance"
            )
        return InstanceGetResponse(PropolisInstance(self.ensured.properties, self.state))

    async def put_state(self, requested: InstanceStateRequested) -> None:
        if self.request_delay_s:
            await trio.sleep(self.request_delay_s)
        self._check()
        if self._refusals:
            raise self._refusals.pop(0)
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
            if not self._hung and self.restless:
                self.gen = max(self.gen, gen)
                break
            if not self._hung and (self.gen >= gen or self.eager):
                break
            await self._changed.wait()
        if self.monitor_delay_s:
            await trio.sleep(self.monitor_delay_s)
        self.monitor_answers += 1
        return InstanceStateMonitorResponse(
            gen=self.gen, state=self.state, migration=self.migration
        )


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
