"""InstanceManager: the registry of VMMs and the nursery their runners live in.

Who starts it: the ``SledAgent`` (``run``), after the notifier and the reaper.
What it owns: the registry and the runners nursery (one ``InstanceRunner`` per VMM).
What it hands on: state-change requests to each VMM's runner queue (``send_nowait``: a
full queue is ``ChannelFull`` at once). Reads never go through a runner: they are
answered from the registry (under the ``inline`` baseline, as in omicron, they queue).
When Nexus acknowledges a VMM's terminal state (the notifier's ``on_delivered``), the
VMM leaves the registry; from then on it is ``NoSuchVmm``.
On cancellation the runners stop where they are; their zones stay for the next start.
"""

from __future__ import annotations

import uuid

import structlog
import trio

from ._errors import BadRequest, HostFull, PropolisAlreadyRegistered, ShuttingDown, Terminating
from ._host import ZONE_PREFIX, Zone
from ._registry import Registry, VmmEntry, VmmPhase
from ._runner import InstanceRunner, PutState, ReadState, RunnerContext
from ._stats import HALT_TO_PUBLISH_BUCKETS, Histogram
from ._vmm_state import initial_state
from ._wire import (
    InstanceEnsureBody,
    SledVmmState,
    VmmPutStateResponse,
    VmmState,
    VmmStateRequested,
    VmmUnregisterResponse,
    utcnow,
)

log = structlog.get_logger("sledagent.manager")


def _require(value: object, kind: type, name: str) -> None:
    # The API decodes into these types; a library caller gets the same clear refusal.
    if not isinstance(value, kind):
        raise BadRequest(f"`{name}` must be a {kind.__name__}, got {type(value).__name__}")


class InstanceManager:
    _HALT_SAMPLES = 4096

    def __init__(self, ctx: RunnerContext) -> None:
        self._ctx = ctx
        self.registry = Registry()
        self._runners: trio.Nursery | None = None
        self._accepting = True
        #: Seconds from a terminal state being recorded to Nexus acknowledging it.
        self.halt_to_publish_s: list[float] = []
        #: The same, every one since start (``sledagent_halt_to_publish_seconds``).
        self.halt_to_publish = Histogram(HALT_TO_PUBLISH_BUCKETS)
        ctx.notifier.on_delivered = self._on_delivered

    @property
    def inline(self) -> bool:
        return self._ctx.inline is not None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host the runners until cancelled."""
        async with trio.open_nursery() as nursery:
            self._runners = nursery
            task_status.started()
            await trio.sleep_forever()

    def stop_accepting(self) -> None:
        """Refuse new registrations (shutdown); existing VMMs keep being served."""
        self._accepting = False

    # --- the operations behind the API ------------------------------------------------

    def register(self, propolis_id: uuid.UUID, body: InstanceEnsureBody) -> SledVmmState:
        """Register a VMM; idempotent for the same instance id."""
        _require(propolis_id, uuid.UUID, "propolis_id")
        _require(body, InstanceEnsureBody, "body")
        existing = self.registry.find(propolis_id)
        if existing is not None:
            if existing.instance_id != body.instance_id:
                raise PropolisAlreadyRegistered(
                    f"VMM {propolis_id} is already registered for instance "
                    f"{existing.instance_id}, not {body.instance_id}"
                )
            return existing.state
        if not self._accepting or self._runners is None:
            raise ShuttingDown("the sled agent is not accepting new VMMs")
        zones = len(self.registry) + self._ctx.reaper.backlog
        if zones >= self._ctx.config.max_zones:
            raise HostFull(
                f"this sled holds {zones} zones (max_zones = {self._ctx.config.max_zones}); "
                "retry once defunct zones have been torn down"
            )
        state = initial_state(body.vmm_runtime, body.migration_id, utcnow())
        entry = VmmEntry(propolis_id=propolis_id, body=body, state=state)
        entry.runner = InstanceRunner(entry, self._ctx)
        self.registry.add(entry)
        self._runners.start_soon(entry.runner.run)
        log.info("vmm_registered", propolis_id=str(propolis_id), instance_id=str(body.instance_id))
        return state

    async def register_durably(
        self, propolis_id: uuid.UUID, body: InstanceEnsureBody
    ) -> SledVmmState:
        """``register``, answered once the VMM is journaled: one registered just before
        a crash is known to the next start (which tells Nexus it failed)."""
        state = self.register(propolis_id, body)
        await self._ctx.notifier.record_registered(propolis_id, state)
        return state

    async def get_state(self, propolis_id: uuid.UUID) -> SledVmmState:
        """The VMM's current state, from the registry; raises ``NoSuchVmm``."""
        _require(propolis_id, uuid.UUID, "propolis_id")
        entry = self.registry.get(propolis_id)
        if self.inline:
            await self._inline_read(entry)
        return entry.state

    async def put_state(
        self, propolis_id: uuid.UUID, requested: VmmStateRequested
    ) -> VmmPutStateResponse:
        """Queue a state change on the VMM's runner and wait for its answer.

        Raises ``NoSuchVmm``, ``Terminating`` (halted), ``ChannelFull`` (queue full)."""
        _require(requested, VmmStateRequested, "requested")
        entry = self.registry.get(propolis_id)
        if entry.phase is not VmmPhase.ACTIVE:
            raise Terminating(propolis_id)
        request = PutState(requested)
        runner: InstanceRunner = entry.runner
        runner.submit(request)
        return VmmPutStateResponse(updated_runtime=await request.reply.wait())

    async def unregister(self, propolis_id: uuid.UUID) -> VmmUnregisterResponse:
        """Terminate the VMM at once (destroyed); an unknown VMM is not an error."""
        _require(propolis_id, uuid.UUID, "propolis_id")
        entry = self.registry.find(propolis_id)
        if entry is None:
            return VmmUnregisterResponse(updated_runtime=None)
        runner: InstanceRunner = entry.runner
        state = runner.terminate(force=VmmState.DESTROYED)
        if self.inline:
            await runner.finished.wait()  # omicron answers after the zone is gone
            state = entry.state
        return VmmUnregisterResponse(updated_runtime=state)

    def live_zone(self, zone_name: str) -> Zone | None:
        """The zone of an active VMM, by zone name (for explicit bundles)."""
        if not zone_name.startswith(ZONE_PREFIX):
            return None
        try:
            propolis_id = uuid.UUID(zone_name.removeprefix(ZONE_PREFIX))
        except ValueError:
            return None
        entry = self.registry.find(propolis_id)
        if entry is None or entry.phase is not VmmPhase.ACTIVE:
            return None
        runner: InstanceRunner = entry.runner
        return runner.zone

    async def _inline_read(self, entry: VmmEntry) -> None:
        runner: InstanceRunner = entry.runner
        if entry.phase is VmmPhase.ACTIVE:
            request = ReadState()
            try:
                runner.submit(request)
            except Terminating:
                pass
            else:
                await request.reply.wait()
                return
        await runner.finished.wait()

    # --- from the notifier --------------------------------------------------------------

    def _on_delivered(
        self, propolis_id: uuid.UUID, state: SledVmmState, acknowledged: bool
    ) -> None:
        entry = self.registry.find(propolis_id)
        if entry is None or entry.phase is not VmmPhase.HALTED:
            return
        if not state.vmm_state.state.is_halted or state.gen < entry.state.gen:
            return  # an earlier state; the terminal one is still on its way
        entry.phase = VmmPhase.PUBLISHED
        if entry.halted_at is not None and acknowledged:
            took = trio.current_time() - entry.halted_at
            self.halt_to_publish_s.append(took)
            self.halt_to_publish.observe(took)
            if len(self.halt_to_publish_s) > self._HALT_SAMPLES:
                del self.halt_to_publish_s[: -self._HALT_SAMPLES]
        self.registry.remove(propolis_id)
        self._ctx.notifier.forget(propolis_id)
        log.info(
            "vmm_removed",
            propolis_id=str(propolis_id),
            gen=state.gen,
            acknowledged=acknowledged,
        )
