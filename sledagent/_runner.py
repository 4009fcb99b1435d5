"""InstanceRunner: applies one VMM's state-change requests, one at a time.

Who starts it: the ``InstanceManager``, in its runners nursery, at registration.
What it owns: the VMM's zone (until it hands it off), its Propolis client and its
monitor task (in the runner's own nursery). Requests arrive on a bounded memory channel;
a full channel is the caller's ``ChannelFull``, never a wait.

Termination (``terminate``) is synchronous and can be called from anywhere in the
trio thread: by the monitor on a halted observation, by the stop grace timer, by a stop
with no VMM, or by the manager on unregister. In this order it records the terminal
state (generation + 1), hands the zone to the reaper (``send_nowait``; the runner keeps no
reference), asks the notifier to publish, and closes the runner's queue. Nothing waits
for bundling or teardown: that is the fix for omicron #5237/#5235. A request in flight
is cancelled; it and every queued request get ``Terminating`` (410), but for reads and
stops, which get the terminal state.

A migration target is created in Propolis with ``init: MigrationTarget`` (the
registered migration id, the source's address: ``_migration``) and watched by the source
deadline; an end the agent forces while a migration is active stops the VMM's Propolis
first (``end_vmm``). Both live in ``_ending`` (docs/design.md, "Live migration").

Under the ``inline`` policy (the measured baseline) the runner instead bundles and halts
the zone itself after terminating, and publishes only then, as omicron does.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import structlog
import trio

from ._ending import RunnerEnding
from ._errors import (
    AgentError,
    ChannelFull,
    GenerationExhausted,
    PeerError,
    PropolisGone,
    ShuttingDown,
    Terminating,
    VmNotRunning,
    bounded,
)
from ._host import DefunctZone, PropolisClient, Zone, ZoneSpec
from ._migration import migration_pending, migration_target_init, spec_init
from ._monitor import Seen, follow_propolis
from ._registry import VmmEntry, VmmPhase
from ._requests import (
    Adoption,
    OneShotTimer,
    PutState,
    ReadState,
    Request,
    RunnerContext,
    caller_error,
    ensure_request,
)
from ._vmm_state import Observation, apply_observation, transition
from ._wire import (
    U64_MAX,
    InstanceEnsureBody,
    InstanceStateMonitorResponse,
    InstanceStateRequested,
    SledVmmState,
    VmmState,
    VmmStateRequested,
    VmmStateRequestedType,
    ZoneBundleCause,
    utcnow,
)


class InstanceRunner(RunnerEnding):
    def __init__(
        self,
        entry: VmmEntry,
        ctx: RunnerContext,
        *,
        on_abandoned: Callable[[uuid.UUID], None] | None = None,
        adoption: Adoption | None = None,
        ended: bool = False,
    ) -> None:
        """``adoption``: a VMM taken back after a restart (``run`` re-adopts it first).
        ``ended``: a VMM that ended before a restart, held only until Nexus answers its
        terminal state; it has no task (``run`` is not called)."""
        self.entry = entry
        self._ctx = ctx
        #: Set once the runner serves requests: at once for a new VMM; for one taken
        #: back after an agent restart, once its Propolis has answered (or failed to).
        self.adopted = trio.Event()
        self._adoption = adoption
        #: Called when the VMM ends with no state left to publish (its generation is
        #: the u64 maximum): the manager drops it, as Nexus can never acknowledge it.
        self.on_abandoned = on_abandoned
        #: Called once a re-adopted VMM's adoption is over (the manager's count).
        self.on_adopted: Callable[[], None] | None = None
        self._send, self._recv = trio.open_memory_channel[Request](ctx.config.runner_queue_size)
        # What terminate() interrupts: only work that is actually waiting on something.
        # (An idle runner just sees its queue close; no Cancelled is thrown through it.)
        self._request_scope: trio.CancelScope | None = None
        self._monitor_scope = trio.CancelScope()
        self._stop_grace = OneShotTimer()
        #: A migration target's deadline for its source to answer.
        self._source_deadline = OneShotTimer()
        self._nursery: trio.Nursery | None = None
        # A re-adopted VMM's zone is its own from the start: a terminate() during the
        # adoption hands it to the reaper like any other.
        self._zone: Zone | None = None if adoption is None else adoption.zone
        self._inline_zone: Zone | None = None
        self._deferred: list[Request] = []
        self._client: PropolisClient | None = None
        self._observing = False
        self._halted = False
        #: Propolis has answered the state monitor about this VM: from then on its
        #: ``NoInstance`` means the VM is gone (before, Propolis may still be creating it).
        self.seen_live = False
        self._exhausted_logged = False
        self.finished = trio.Event()
        self._log = structlog.get_logger("sledagent.runner").bind(
            propolis_id=str(entry.propolis_id)
        )
        if ended:
            self._halted = True
            self._send.close()
            self.adopted.set()
            self.finished.set()

    @property
    def propolis_id(self) -> uuid.UUID:
        return self.entry.propolis_id

    @property
    def zone(self) -> Zone | None:
        """The VMM's live zone, until it is handed off."""
        return self._zone

    def _set_adopted(self) -> None:
        if not self.adopted.is_set():
            self.adopted.set()
            if self._adoption is not None and self.on_adopted is not None:
                self.on_adopted()

    @property
    def _body(self) -> InstanceEnsureBody:
        # Only a VMM an older journal knew by its state alone has none; it never runs.
        assert self.entry.body is not None, "a running VMM always has its registration"
        return self.entry.body

    @property
    def context(self) -> RunnerContext:
        return self._ctx

    @property
    def halted(self) -> bool:
        return self._halted

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[trio.CancelScope]:
        """A scope that ``terminate`` cancels (work on behalf of the VMM, not a request
        of a caller: re-adoption's question to Propolis)."""
        with trio.CancelScope() as scope:
            self._request_scope = scope
            try:
                yield scope
            finally:
                self._request_scope = None

    # --- called by the manager -------------------------------------------------------

    def submit(self, request: Request) -> None:
        """Queue a request; raises ``ChannelFull`` or ``Terminating`` at once."""
        if self._halted:
            raise Terminating(self.propolis_id)
        try:
            self._send.send_nowait(request)
        except trio.WouldBlock:
            raise ChannelFull(self.propolis_id, self._ctx.config.runner_queue_size) from None
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            if not self._halted:  # the agent stops (SIGTERM): the VMM lives on
                raise self._shutting_down() from None
            raise Terminating(self.propolis_id) from None

    def terminate(self, force: VmmState | None = None) -> SledVmmState:
        """Record the terminal state, hand off the zone, publish; idempotent.

        ``force`` moves the VMM to that state first (``destroyed`` on unregister or an
        expired stop grace, ``failed`` when Propolis is gone); without it the current
        state must already be terminal (a halted observation).
        """
        entry = self.entry
        if self._halted:
            return entry.state
        publishable = True
        if force is not None:
            try:
                entry.state = transition(entry.state, force, utcnow())
            except GenerationExhausted as exc:
                # No generation is left to tell Nexus with: the VMM still ends here (its
                # zone is reaped) but nothing is sent; it leaves the registry at once.
                self._log.error(
                    "generation_exhausted",
                    error=str(exc),
                    forced=force.value,
                    outcome="ended unpublished: zone reaped, VMM abandoned",
                )
                publishable = False
        self._halted = True
        entry.phase = VmmPhase.HALTED
        entry.halted_at = trio.current_time()
        zone, self._zone, self._client = self._zone, None, None
        self._log.info("vmm_halted", state=entry.state.vmm_state.state.value, gen=entry.state.gen)
        if zone is not None:
            self._hand_off(zone)
        if not publishable:
            if self.on_abandoned is not None:
                self.on_abandoned(self.propolis_id)
        elif self._ctx.inline is None:
            self._ctx.notifier.publish(self.propolis_id, entry.state)
        self._send.close()  # the serve loop answers what is queued, then ends
        if self._request_scope is not None:
            self._request_scope.cancel()  # a request in flight gets Terminating
        if not self._observing:
            self._monitor_scope.cancel()  # (from the monitor itself: it returns by itself)
        self._stop_grace.cancel()
        self._source_deadline.cancel()
        return entry.state

    def _hand_off(self, zone: Zone) -> None:
        """Give up a defunct zone: to the reaper, or (inline) to run()'s own teardown."""
        self._ctx.connector.forget(zone)
        if self._ctx.inline is not None:
            self._inline_zone = zone  # torn down by run(), before publishing (omicron)
        else:
            self._ctx.reaper.submit(
                DefunctZone(zone, ZoneBundleCause.TERMINATED_INSTANCE, utcnow())
            )

    # --- the task ---------------------------------------------------------------------

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self._adoption is not None:
                    from ._readopt import readopt  # the restart path lives in its own room

                    await readopt(self, self._adoption)
                self._set_adopted()
                nursery.start_soon(self._serve)
            if self._halted and self._ctx.inline is not None:
                if self._inline_zone is not None:
                    zone, self._inline_zone = self._inline_zone, None
                    await self._ctx.inline.teardown(zone, self._log)
                self._ctx.notifier.publish(self.propolis_id, self.entry.state)
        finally:
            self._set_adopted()
            self._send.close()
            for request in self._deferred:
                self._answer_unserved(request)
            self._answer_leftovers()
            self.finished.set()

    def _shutting_down(self) -> ShuttingDown:
        return ShuttingDown(
            f"the sled agent is stopping; VMM {self.propolis_id} is left running for its "
            "next start: retry"
        )

    def _answer_unserved(self, request: Request) -> None:
        """A request the runner ends without serving: halted, the halt's answer; the
        agent stopping (the runner cancelled, the VMM still live), 503 to retry.

        Never ``NO_SUCH_INSTANCE`` for a VMM that lives on: Nexus marks a VMM its sled
        says is not there Failed (omicron #6455, RFD 486), and the next start takes the
        guest back: the duplicate a restart must not make (issue 18)."""
        if self._halted:
            self._answer_halted(request)
        else:
            request.reply.fail(self._shutting_down())

    def _answer_leftovers(self) -> None:
        while True:
            try:
                request = self._recv.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return
            self._answer_unserved(request)

    def _answer_halted(self, request: Request) -> None:
        """Answer a request the halt overtook: a read or a stop gets the terminal state
        (the stop got what it asked for, however the VM came to halt, just as when
        Propolis's answer comes first); any other change gets ``Terminating``."""
        if isinstance(request, ReadState) or request.requested.type is (
            VmmStateRequestedType.STOPPED
        ):
            request.reply.ok(self.entry.state)
        else:
            request.reply.fail(Terminating(self.propolis_id))

    async def _serve(self) -> None:
        async for request in self._recv:
            if self._halted and self._ctx.inline is not None:
                # omicron: what is queued waits until the runner has torn the zone down.
                self._answer_later(request)
                return
            if self._halted:
                self._answer_halted(request)
            elif isinstance(request, ReadState):
                request.reply.ok(self.entry.state)
            else:
                await self._apply(request)

    def _answer_later(self, request: Request) -> None:
        self._deferred.append(request)

    async def _apply(self, request: PutState) -> None:
        with trio.CancelScope() as scope:
            self._request_scope = scope
            try:
                request.reply.ok(await self._put_state(request.requested))
            except AgentError as exc:
                request.reply.fail(exc)
            except PeerError as exc:
                if isinstance(exc, PropolisGone) and self.seen_live:
                    await self.end_vmm(VmmState.FAILED)  # (a target still migrating in)
                request.reply.fail(self._propolis_error(exc))
            except Exception as exc:  # a bug must not take the runner (and its VMM) down
                self._log.exception("put_state_error")
                request.reply.fail(AgentError(f"internal error: {exc!r}"))
            finally:
                self._request_scope = None
                if not self._halted:  # cancelled from outside: the agent stops
                    request.reply.fail(self._shutting_down())  # (no-op once answered)
        if scope.cancelled_caught:  # terminated while waiting on Propolis
            self._answer_halted(request)

    def _propolis_error(self, exc: PeerError) -> AgentError:
        """What the caller (Nexus) is answered when Propolis did not do what we asked
        (the table in docs/design.md, "Propolis errors")."""
        if isinstance(exc, PropolisGone) and self.seen_live:
            # Propolis restarted under a VM it had run: the VM is gone for good.
            self._log.error("propolis_lost_vm", error=str(exc))
            self.terminate(force=VmmState.FAILED)
        return caller_error(exc, self.propolis_id, seen_live=self.seen_live)

    async def _put_state(self, requested: VmmStateRequested) -> SledVmmState:
        if self.entry.state.gen >= U64_MAX:
            raise GenerationExhausted(
                f"VMM {self.propolis_id} is at generation {self.entry.state.gen}, the u64 "
                "maximum: no state change can be published"
            )
        kind = requested.type
        if kind is VmmStateRequestedType.MIGRATION_TARGET:
            assert requested.value is not None  # the wire model requires it
            await self._ensure(migration_target_init(self._body, requested.value))
            self.resume_source_deadline(self._ctx.config.migration_source_timeout_s)
        elif kind is VmmStateRequestedType.RUNNING:
            client = await self._ensure(spec_init(self._body))
            await client.put_state(InstanceStateRequested.RUN)
        elif kind is VmmStateRequestedType.STOPPED:
            if self._client is None:
                # Nothing will ever report a state: go straight to destroyed.
                return self.terminate(force=VmmState.DESTROYED)
            self._start_stop_timer()
            await self._client.put_state(InstanceStateRequested.STOP)
            self._set_state(transition(self.entry.state, VmmState.STOPPING, utcnow()))
        elif kind is VmmStateRequestedType.REBOOT:
            if self._client is None:
                raise VmNotRunning(self.propolis_id)
            await self._client.put_state(InstanceStateRequested.REBOOT)
            self._set_state(transition(self.entry.state, VmmState.REBOOTING, utcnow()))
        return self.entry.state

    async def _ensure(self, init: dict[str, Any]) -> PropolisClient:
        """Install the zone and create the VM in Propolis (``init``: a ``Spec`` or a
        ``MigrationTarget``), once."""
        if self._client is not None:
            return self._client
        ctx = self._ctx
        # A zone re-adopted without a VM (the agent died between install and ensure)
        # is used as it is; otherwise the zone is installed now.
        zone = self._zone if self._zone is not None else await self._install()
        client = ctx.connector.client_for(zone)
        try:
            await client.ensure(ensure_request(self._body, ctx.sled_id, init))
        except PeerError as exc:
            # As omicron's runner: a VM Propolis did not create fails the VMM (the zone
            # goes to the reaper). The caller is told that, not "retry".
            self._log.error("propolis_ensure_failed", error=bounded(str(exc)))
            self.terminate(force=VmmState.FAILED)
            raise Terminating(
                self.propolis_id, bounded(f"has failed: Propolis did not create its VM: {exc}")
            ) from exc
        self._journal_mark(ensured=True)
        self.start_monitor(client, zone)
        return client

    async def _install(self) -> Zone:
        ctx, body = self._ctx, self._body
        spec = ZoneSpec(self.propolis_id, body.instance_id, body.propolis_addr, body.nic_ids)
        await ctx.nics.acquire(spec.nic_ids, spec.zone_name, ctx.config.nic_release_timeout_s)
        try:
            zone = await ctx.backend.install(spec)
        except Exception as exc:
            ctx.nics.release(spec.zone_name)
            self._log.error("zone_install_failed", error=repr(exc))
            self.terminate(force=VmmState.FAILED)
            raise Terminating(
                self.propolis_id, f"has failed: could not install zone {spec.zone_name}: {exc}"
            ) from exc
        except BaseException:  # cancelled (terminated) mid-install: the backend cleans up
            ctx.nics.release(spec.zone_name)
            raise
        if self._halted:  # terminated while installing: the zone is defunct at birth
            self._hand_off(zone)
            raise Terminating(self.propolis_id)
        self._zone = zone
        return zone

    def start_monitor(self, client: PropolisClient, zone: Zone, *, gen: int = 0) -> None:
        """Follow Propolis from generation ``gen``: the VMM now has a VM there."""
        self._client = client
        assert self._nursery is not None
        self._nursery.start_soon(self._monitor, client, zone, gen)

    def _journal_mark(self, **facts: Any) -> None:
        journal = self._ctx.notifier.journal
        if journal is not None:
            journal.mark(self.propolis_id, **facts)

    async def _monitor(self, client: PropolisClient, zone: Zone, gen: int) -> None:
        config = self._ctx.config
        with self._monitor_scope:
            try:
                await follow_propolis(
                    client,
                    gen=gen,
                    backoff=config.monitor_backoff,
                    unreachable_s=config.propolis_unreachable_s,
                    on_observation=self.observe,
                    on_gone=self._gone,
                    zone_exists=lambda: self._ctx.backend.zone_exists(zone),
                    seen_live=lambda: self.seen_live,
                    log=self._log,
                )
            except Exception as exc:  # whatever a peer did: it costs this VMM, not the daemon
                self._log.exception("monitor_error")
                self._gone(bounded(f"the state monitor failed: {exc!r}"))

    def observe(self, response: InstanceStateMonitorResponse) -> Seen:
        """Apply one Propolis observation: ``Seen.HALTED`` once the VMM has halted. An
        observation that changes nothing Nexus is told is not published (nor a new
        generation): ``Seen.NOTHING``. A halt with no generation left to publish it still
        ends the VMM: its zone is reaped and it is dropped as abandoned (``terminate``)."""
        if self._halted:
            return Seen.HALTED
        if not self.seen_live:
            self.seen_live = True
            self._journal_mark(seen_live=True)
        observation = Observation.from_monitor(response, utcnow())
        try:
            new = apply_observation(self.entry.state, observation)
        except GenerationExhausted as exc:
            if observation.vmm_state.is_halted:
                self._observing = True
                self.terminate(force=observation.vmm_state)  # logs it, drops it as abandoned
                return Seen.HALTED
            if not self._exhausted_logged:
                self._exhausted_logged = True
                self._log.error("generation_exhausted", error=str(exc),
                                observed=observation.vmm_state.value)  # fmt: skip
            return Seen.NOTHING
        if new is self.entry.state:
            return Seen.NOTHING
        self.entry.state = new
        if new.vmm_state.state.is_halted:
            self._observing = True
            self.terminate()
            return Seen.HALTED
        if not migration_pending(new):
            self._source_deadline.cancel()  # the source answered: Propolis owns the rest
        self._ctx.notifier.publish(self.propolis_id, new)
        return Seen.CHANGED

    def gone(self, why: str) -> None:
        """Propolis no longer has the VM (or cannot be reached): the VMM failed."""
        self._gone(why)

    def _gone(self, why: str) -> None:
        self._log.warning("propolis_gone", reason=why)
        self.terminate(force=VmmState.FAILED)

    def _set_state(self, state: SledVmmState) -> None:
        if self._halted:
            # A request's answer that arrives after the monitor saw the VMM halt (the
            # guest stopped before Propolis answered the stop): the terminal state stays.
            return
        self.entry.state = state
        self._ctx.notifier.publish(self.propolis_id, state)
