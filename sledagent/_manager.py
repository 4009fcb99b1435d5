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

from ._errors import (
    BadRequest,
    GenerationExhausted,
    HostFull,
    PropolisAlreadyRegistered,
    ShuttingDown,
    Terminating,
    Unavailable,
)
from ._host import ZONE_PREFIX, DefunctZone, Zone
from ._journal import JournaledVmm
from ._migration import unregister_state
from ._registry import Registry, VmmEntry, VmmPhase
from ._requests import Adoption, PutState, ReadState, RunnerContext
from ._runner import InstanceRunner
from ._stats import HALT_TO_PUBLISH_BUCKETS, Histogram
from ._vmm_state import initial_state, transition
from ._wire import (
    InstanceEnsureBody,
    SledVmmState,
    VmmPutStateResponse,
    VmmState,
    VmmStateRequested,
    VmmUnregisterResponse,
    ZoneBundleCause,
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
        self._readopting = 0  # re-adopted VMMs whose Propolis has not answered yet
        #: Seconds from a terminal state being recorded to Nexus acknowledging it.
        self.halt_to_publish_s: list[float] = []
        #: The same, every one since start (``sledagent_halt_to_publish_seconds``).
        self.halt_to_publish = Histogram(HALT_TO_PUBLISH_BUCKETS)
        ctx.notifier.on_delivered = self._on_delivered
        ctx.notifier.answerable = self.registry.set_answer

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
        self._ctx.notifier.record_registration(propolis_id, body, state)
        entry = VmmEntry(propolis_id=propolis_id, body=body, state=state)
        entry.runner = InstanceRunner(entry, self._ctx, on_abandoned=self._abandon)
        self.registry.add(entry)
        if self._ctx.notifier.is_journaled(propolis_id):  # no journal: answerable now
            self.registry.set_answer(propolis_id, state)
        self._runners.start_soon(entry.runner.run)
        log.info("vmm_registered", propolis_id=str(propolis_id), instance_id=str(body.instance_id))
        return state

    async def register_durably(
        self, propolis_id: uuid.UUID, body: InstanceEnsureBody
    ) -> SledVmmState:
        """``register``, answered once the VMM is journaled: one registered just before
        a crash is known to the next start (which tells Nexus it failed)."""
        state = self.register(propolis_id, body)
        await self._ctx.notifier.journaled(propolis_id)
        return state

    async def get_state(self, propolis_id: uuid.UUID) -> SledVmmState:
        """The VMM's current state, from the registry; raises ``NoSuchVmm``."""
        _require(propolis_id, uuid.UUID, "propolis_id")
        entry = self.registry.get(propolis_id)
        if self.inline:
            await self._inline_read(entry)
        return await self.answerable_state(entry)

    async def answerable_state(self, entry: VmmEntry) -> SledVmmState:
        """The VMM's state once it is journaled: an answer is a promise a crash must not
        take back (a QA drill: a stop answered ``stopping`` at gen 3, killed before the
        journal write, then ``destroyed`` at gen 3 published after the restart: the same
        generation with other content). Waits for the journal's next batch at most
        (milliseconds), only while a write of this VMM's is pending."""
        notifier = self._ctx.notifier
        while not notifier.is_journaled(entry.propolis_id):
            await notifier.journaled(entry.propolis_id)
        return entry.state

    async def put_state(
        self, propolis_id: uuid.UUID, requested: VmmStateRequested
    ) -> VmmPutStateResponse:
        """Queue a state change on the VMM's runner and wait for its answer.

        Raises ``NoSuchVmm``, ``Terminating`` (halted), ``ChannelFull`` (queue full)."""
        _require(requested, VmmStateRequested, "requested")
        entry = self.registry.get(propolis_id)
        runner: InstanceRunner = entry.runner
        if entry.phase is VmmPhase.ACTIVE and not runner.adopted.is_set():
            # Taken back after a restart: its Propolis has not answered yet.
            with trio.move_on_after(self._ctx.config.readopt_wait_s):
                await runner.adopted.wait()
            if not runner.adopted.is_set():
                raise Unavailable(
                    f"VMM {propolis_id} is being re-adopted after an agent restart; retry"
                )
        if entry.phase is not VmmPhase.ACTIVE:
            raise Terminating(propolis_id)
        request = PutState(requested)
        runner.submit(request)
        answer = await request.reply.wait()
        await self.answerable_state(entry)  # on disk with everything before it
        return VmmPutStateResponse(updated_runtime=answer)

    async def unregister(self, propolis_id: uuid.UUID) -> VmmUnregisterResponse:
        """Terminate the VMM at once; an unknown VMM is not an error. It ends
        ``destroyed``, or ``failed`` with its migration if one is under way (omicron's
        rule: ``_migration.unregister_state``)."""
        _require(propolis_id, uuid.UUID, "propolis_id")
        entry = self.registry.find(propolis_id)
        if entry is None:
            return VmmUnregisterResponse(updated_runtime=None)
        runner: InstanceRunner = entry.runner
        state = await runner.end_vmm(unregister_state(entry.state))
        if self.inline:
            await runner.finished.wait()  # omicron answers after the zone is gone
            state = entry.state
        await self._ctx.notifier.journaled(propolis_id)  # the answer is on disk
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

    # --- after a restart (``_readopt``) ---------------------------------------------------

    def readopt(self, vmm: JournaledVmm, zone: Zone | None) -> None:
        """Take back a live VMM the journal remembers: its entry answers reads at once
        (the journaled state); its runner asks Propolis before serving requests."""
        assert vmm.registration is not None and self._runners is not None
        entry = VmmEntry(propolis_id=vmm.propolis_id, body=vmm.registration, state=vmm.state)
        entry.runner = InstanceRunner(
            entry, self._ctx, on_abandoned=self._abandon, adoption=Adoption(vmm, zone)
        )
        entry.runner.on_adopted = self._adopted_one
        self._readopting += 1
        self.registry.add(entry)
        self.registry.set_answer(vmm.propolis_id, vmm.state)  # read back from the disk
        self._runners.start_soon(entry.runner.run)
        if vmm.unacknowledged:  # Nexus may have missed it: the same content again
            self._ctx.notifier.publish(vmm.propolis_id, vmm.state)

    def restore_ended(self, vmm: JournaledVmm, zone: Zone | None) -> None:
        """A VMM that ended before the restart, or one an older journal knew only by its
        state (it cannot be taken back: ``failed``, one generation on). Its zone is
        reaped; it is held as halted until Nexus answers its terminal state."""
        pid, state = vmm.propolis_id, vmm.state
        if zone is not None:
            self._ctx.reaper.submit(
                DefunctZone(zone, ZoneBundleCause.TERMINATED_INSTANCE, utcnow())
            )
        journal = self._ctx.notifier.journal
        try:
            if not state.vmm_state.state.is_halted:
                state = transition(state, VmmState.FAILED, utcnow())
        except GenerationExhausted:
            state = vmm.state  # cannot be told: forgotten below
        acknowledged = state is vmm.state and not vmm.unacknowledged
        if acknowledged or not state.vmm_state.state.is_halted:
            if journal is not None:
                journal.close(pid)  # Nexus has it already (or can never be told)
            return
        entry = VmmEntry(propolis_id=pid, body=vmm.registration, state=state)
        entry.runner = InstanceRunner(entry, self._ctx, ended=True)
        entry.phase = VmmPhase.HALTED
        self.registry.add(entry)
        if state is vmm.state:
            self.registry.set_answer(pid, state)  # read back from the disk
        self._ctx.notifier.publish(pid, state)
        log.info(
            "vmm_ended_before_restart",
            propolis_id=str(pid),
            state=state.vmm_state.state.value,
            gen=state.gen,
        )

    def readopting(self) -> int:
        """VMMs taken back from the journal whose Propolis has not answered yet."""
        return self._readopting

    def _adopted_one(self) -> None:
        self._readopting -= 1

    def _abandon(self, propolis_id: uuid.UUID) -> None:
        """A VMM ended with no generation left to publish it with: drop it now."""
        self.registry.remove(propolis_id)
        self._ctx.notifier.forget(propolis_id)
        journal = self._ctx.notifier.journal
        if journal is not None:
            journal.close(propolis_id)
        log.error("vmm_abandoned", propolis_id=str(propolis_id), reason="generation exhausted")

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
