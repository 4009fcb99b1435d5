"""FakePropolis: a scriptable Propolis state stream, one per VMM, all in process.

The long-poll follows Propolis's semantics: ``state_monitor(gen)`` answers at once when
the fake's generation is at least ``gen``, and otherwise waits for the next change.
With ``auto=True`` (the default) requests behave like Propolis: ``Run`` walks Starting
-> Running, ``Stop`` walks Stopping -> Stopped -> Destroyed, ``Reboot`` Rebooting ->
Running. Tests script everything else: ``push``, ``halt`` (the guest powers off),
``fail``, ``disconnect``, ``error`` (the state monitor's answers), ``refuse`` (the
requests'), ``hang``, ``vanish``.
"""

from __future__ import annotations

import uuid

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
        self._refusals: list[PeerError] = []

    # --- scripting ----------------------------------------------------------------------

    def push(
        self, state: InstanceState, *, migration: InstanceMigrateStatusResponse | None = None
    ) -> None:
        """Move to ``state`` (generation + 1) and wake every waiting monitor."""
        self.gen += 1
        self.state = state
        if migration is not None:
            self.migration = migration
        if state in (InstanceState.DESTROYED, InstanceState.FAILED) and self.halted_at is None:
            self.halted_at = trio.current_time()
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
        """The process is gone: every call fails with ``PropolisGone``."""
        self._gone = True
        self._wake()

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
        if self.request_delay_s:
            await trio.sleep(self.request_delay_s)
        self._check()
        if self._refusals:
            raise self._refusals.pop(0)
        if self.ensured is None:
            self.ensured = request
            self.push(InstanceState.CREATING)

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
        if self.ensured is None:
            raise PropolisGone(
                "Server not initialized (no instance)", status=424, code="NoInstance"
            )
        if self._request_errors:
            raise self._request_errors.pop(0)
        self.requests.append(requested)
        if not self.auto:
            return
        if requested is InstanceStateRequested.RUN and self.state is not InstanceState.RUNNING:
            self.push(InstanceState.STARTING)
            self.push(InstanceState.RUNNING)
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


class FakePropolisFleet:
    """A ``PropolisConnector``: one ``FakePropolis`` per VMM, made on first use."""

    def __init__(self, *, auto: bool = True) -> None:
        self.auto = auto
        self.by_id: dict[uuid.UUID | None, FakePropolis] = {}

    def __getitem__(self, propolis_id: uuid.UUID) -> FakePropolis:
        return self.by_id[propolis_id]

    def forget(self, zone: Zone) -> None:
        pass  # the fake keeps its VMs for the test to inspect

    def client_for(self, zone: Zone) -> FakePropolis:
        if zone.propolis_id not in self.by_id:
            self.by_id[zone.propolis_id] = FakePropolis(zone.propolis_id, auto=self.auto)
        return self.by_id[zone.propolis_id]
