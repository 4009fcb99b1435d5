"""SledAgent: one nursery for the process, and the wiring of the core.

```
open_sled_agent (one nursery)
 |- NexusNotifier.run      delivery tasks, one per VMM with an undelivered state
 |- Reaper.run             one task per defunct zone: bundle, then halt
 |- InstanceManager.run    the runners nursery: one InstanceRunner (+ monitor) per VMM
 |- BundleJobs.run         explicit bundles of live zones
 |- store.run_periodic_cleanup   retention, every `period` of the cleanup context
```

Before any of them starts, the journal is read back and ``startup_scan`` finds what an
earlier run left (the store's index from the files, partial files removed, leftover
snapshots and the zones on the host listed). Then ``reconcile`` takes back every live
VMM the journal holds (``_readopt``: each runner asks its Propolis before serving),
holds the ones that ended until Nexus has their terminal state, and hands every zone
nobody owns to the reaper. Leftover snapshots are archived into their bundles while the
agent already serves.

Data flows one way: API -> manager -> runner -> reaper -> bundler -> store.

Shutdown (leaving the ``async with``, normally or by cancellation): new registrations
are refused; the reaper and the notifier get ``shutdown_drain_s`` under a shielded
cancel scope to finish what they hold; then everything is cancelled. Live VMMs, their
zones and their Propolis are left as they are, for the next start to take back; whatever
the reaper did not finish stays on the host for the next start's sweep.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import structlog
import trio

from ._bundler import ZoneBundler
from ._config import AgentConfig, TerminationPolicy
from ._host import (
    Archiver,
    BundleStore,
    DefunctZone,
    NexusClient,
    PropolisConnector,
    Snapshot,
    Zone,
    ZoneBackend,
)
from ._inline import InlineTeardown, LockedBundleStore
from ._jobs import BundleJobs
from ._journal import JournaledVmm, JournalError, StateJournal
from ._manager import InstanceManager
from ._nics import NicReservations
from ._notifier import NexusNotifier
from ._readopt import plan as readopt_plan
from ._reaper import Reaper
from ._requests import RunnerContext
from ._wire import ZoneBundleCause, utcnow

log = structlog.get_logger("sledagent.agent")


@attrs.frozen
class Host:
    """The host-facing implementations the agent drives."""

    backend: ZoneBackend
    connector: PropolisConnector
    nexus: NexusClient
    archiver: Archiver
    store: BundleStore
    #: Terminal states not yet acknowledged by Nexus, kept across a crash (daemon only).
    journal: StateJournal | None = None


class SledAgent:
    """The composed core. Build it with ``open_sled_agent``."""

    def __init__(
        self, config: AgentConfig, host: Host, *, sled_id: uuid.UUID | None = None
    ) -> None:
        self.config = config
        self.host = host
        self.sled_id = sled_id or uuid.uuid4()
        self.nics = NicReservations()
        self.bundle_lock = trio.Lock()  # used only by the inline baseline
        inline = config.termination_policy is TerminationPolicy.INLINE
        self.store: BundleStore = (
            LockedBundleStore(host.store, self.bundle_lock) if inline else host.store
        )
        self.bundler = ZoneBundler(
            host.backend,
            host.archiver,
            self.store,
            collect_concurrency=config.bundle_collect_concurrency,
            archive_concurrency=config.bundle_archive_concurrency,
            archive_max_concurrency=config.archive_max_slots,
            archive_small_bytes=config.bundle_archive_small_bytes,
            command_timeout_s=config.command_timeout_s,
            snapshot_cleanup_timeout_s=config.snapshot_cleanup_timeout_s,
        )
        self.notifier = NexusNotifier(
            host.nexus,
            backoff=config.nexus_backoff,
            concurrency=config.nexus_concurrency,
            journal=host.journal,
        )
        self.reaper = Reaper(
            host.backend,
            self.bundler,
            self.nics,
            capacity=config.max_zones,
            backoff=config.reaper_backoff,
            bundle_attempts=config.bundle_attempts,
            teardown_concurrency=config.teardown_concurrency,
            bundle=config.bundle_defunct_zones,
            publications_settled=self.notifier.wait_settled,
            publish_first_s=config.publish_first_s,
        )
        self.manager = InstanceManager(
            RunnerContext(
                config=config,
                backend=host.backend,
                connector=host.connector,
                notifier=self.notifier,
                reaper=self.reaper,
                nics=self.nics,
                sled_id=self.sled_id,
                inline=(
                    InlineTeardown(
                        host.backend,
                        self.bundler,
                        self.nics,
                        self.bundle_lock,
                        config.reaper_backoff,
                    )
                    if inline
                    else None
                ),
            )
        )

        if hasattr(host.connector, "close_after"):  # HTTP Propolis pools: close later
            host.connector.close_after = self.notifier.wait_settled
        self.jobs = BundleJobs(self.bundler, self.manager.live_zone)
        #: Set once the snapshots an earlier run left are archived (``recover_snapshots``).
        self.recovered = trio.Event()
        self._readopting: list[uuid.UUID] = []
        #: Set once every VMM taken back at start has had its Propolis's answer (or none).
        self.readoption_done = trio.Event()

    async def startup_scan(self) -> tuple[list[Snapshot], list[Zone]]:
        """What an earlier run left, found before anything new is made: open the store,
        remove partial bundle files, and list leftover snapshots and the zones on the
        host (for the reconciliation with the journal)."""
        await self.store.open()
        partial = await self.host.archiver.sweep_partial()
        leftovers = await self.host.backend.leftover_snapshots()
        zones = await self.host.backend.list_zones()
        log.info("startup_scan", partial_files=partial, snapshots=len(leftovers), zones=len(zones))
        return leftovers, zones

    def reconcile(
        self,
        journaled: dict[uuid.UUID, JournaledVmm],
        zones: list[Zone],
        *,
        host_rebooted: bool = False,
    ) -> None:
        """Take back every live VMM the journal holds, hold the ones that ended until
        Nexus knows, and hand every zone nobody owns to the reaper (``_readopt``).
        Synchronous: when it returns, every journaled VMM answers reads."""
        found = readopt_plan(journaled, zones, host_rebooted=host_rebooted)
        for vmm, zone in found.readopt:
            self.manager.readopt(vmm, zone)
        self._readopting = [vmm.propolis_id for vmm, _ in found.readopt]
        for vmm, zone in found.ended:
            self.manager.restore_ended(vmm, zone)
        for zone in found.unexpected:
            self.reaper.submit(DefunctZone(zone, ZoneBundleCause.UNEXPECTED_ZONE, utcnow()))
        log.info(
            "reconciled",
            readopting=len(found.readopt),
            ended=len(found.ended),
            unexpected_zones=len(found.unexpected),
            host_rebooted=host_rebooted,
        )

    async def report_readoption(self) -> None:
        """Log once every VMM taken back has had its Propolis's answer (or none)."""
        t0 = trio.current_time()
        states: dict[str, int] = {}
        for pid in self._readopting:
            entry = self.manager.registry.find(pid)
            if entry is not None and entry.runner is not None:
                await entry.runner.adopted.wait()
            entry = self.manager.registry.find(pid)
            state = "removed" if entry is None else entry.state.vmm_state.state.value
            states[state] = states.get(state, 0) + 1
        log.info(
            "readoption_done",
            vmms=len(self._readopting),
            seconds=round(trio.current_time() - t0, 3),
            states=states,
        )
        self.readoption_done.set()

    async def recover_snapshots(self, leftovers: list[Snapshot]) -> None:
        """Archive the snapshots a crash left: their bundles would otherwise be lost (the
        zone may be torn down already). At most the phase-1 limiter's worth exist,
        archived concurrently under the phase-2 limiter, while the agent serves; the
        reaper holds each meanwhile (``GET /zones/cleanup``)."""
        try:
            async with trio.open_nursery() as nursery:
                for snapshot in leftovers:
                    nursery.start_soon(self.reaper.recover, snapshot)
        finally:
            self.recovered.set()

    def publication_backlog(self) -> int:
        """Publications under way now: monitor answers received and waiting to be
        handled (``answers_waiting`` of an HTTP Propolis connector), and states waiting
        for the journal, a delivery slot or Nexus's answer, while Nexus takes them (not
        while its last delivery failed: those cannot complete sooner for reads stepping
        aside). While it is not 0 and the thread lags, state reads are refused
        (``_admission``)."""
        notifier = self.notifier
        under_way = notifier.under_way if notifier.last_error is None else 0
        return under_way or getattr(self.host.connector, "answers_waiting", 0)

    async def drain(self) -> None:
        """Wait until the start's leftover snapshots are archived, the reaper holds no
        zone and the notifier has nothing pending."""
        await self.recovered.wait()
        await self.reaper.wait_idle()
        await self.notifier.wait_idle()


_DRAIN_REPORT_S = 5.0


async def _report_drain(agent: SledAgent, deadline_s: float) -> None:
    """While shutdown drains, say what it waits for: at once, then every few seconds
    (a Nexus that is down otherwise means ``shutdown_drain_s`` of silence)."""
    start = trio.current_time()
    while True:
        zones, states = agent.reaper.backlog, agent.notifier.statistics().pending
        if zones == 0 and states == 0:
            return
        left = round(deadline_s - (trio.current_time() - start), 1)
        nexus_error = agent.notifier.last_error
        if states and nexus_error is not None:
            log.warning(
                "shutdown_waiting_for_nexus",
                states_pending=states,
                zones_left=zones,
                last_error=nexus_error,
                gives_up_in_s=left,
            )
        else:
            log.info(
                "shutdown_draining", zones_left=zones, states_pending=states, gives_up_in_s=left
            )
        await trio.sleep(_DRAIN_REPORT_S)


@asynccontextmanager
async def open_sled_agent(
    config: AgentConfig,
    host: Host,
    *,
    sled_id: uuid.UUID | None = None,
    host_rebooted: bool = False,
) -> AsyncIterator[SledAgent]:
    """Run a sled agent for the duration of the ``async with`` block. ``host_rebooted``:
    the host booted since the journal was written (no guest survived)."""
    agent = SledAgent(config, host, sled_id=sled_id)
    # Before the nursery: a refusal to start is the operator's one line, not a group.
    journal = host.journal
    journaled = await journal.load() if journal is not None else {}
    leftovers, zones = await agent.startup_scan()  # before any snapshot is taken
    if journal is not None and journal.started_empty and not host_rebooted:
        _refuse_zones_without_journal(journal.path, zones)
    async with trio.open_nursery() as nursery:
        if journal is not None:
            await nursery.start(journal.run)
        await nursery.start(agent.notifier.run)
        await nursery.start(agent.manager.run)
        agent.reconcile(journaled, zones, host_rebooted=host_rebooted)
        if agent._readopting:
            nursery.start_soon(agent.report_readoption)
        else:
            agent.readoption_done.set()
        await nursery.start(agent.reaper.run)
        nursery.start_soon(agent.recover_snapshots, leftovers)
        await nursery.start(agent.jobs.run)
        await nursery.start(agent.store.run_periodic_cleanup)
        log.info(
            "agent_started", policy=config.termination_policy.value, sled_id=str(agent.sled_id)
        )
        try:
            yield agent
        finally:
            agent.manager.stop_accepting()
            with trio.move_on_after(config.shutdown_drain_s, shield=True) as scope:
                async with trio.open_nursery() as reporting:
                    reporting.start_soon(_report_drain, agent, config.shutdown_drain_s)
                    await agent.drain()
                    reporting.cancel_scope.cancel()
            if scope.cancelled_caught:
                log.warning(
                    "shutdown_drain_timeout",
                    zones_left=agent.reaper.backlog,
                    states_pending=agent.notifier.statistics().pending,
                )
            nursery.cancel_scope.cancel()


def _refuse_zones_without_journal(path: Path, zones: list[Zone]) -> None:
    """A new or emptied journal beside zones of VMMs: the journal was lost, not never
    written. Starting would take every guest for unknown and tear it down (a QA drill
    deleted the journal of 6 running VMMs); refuse, in one line, with the way out."""
    vmm_zones = [z.name for z in zones if z.propolis_id is not None]
    if vmm_zones:
        raise JournalError(
            f"the journal {path} is new or empty, but {len(vmm_zones)} zones of VMMs are "
            f"on this host (e.g. {vmm_zones[0]}): their guests may be running; restore the "
            "journal, or remove those zones to start afresh"
        )
