"""Reaper: owns every defunct zone it receives; bundles it, then tears it down.

Who starts it: the ``SledAgent``, in the agent's nursery, independent of the runners
nursery, so a runner can hand off its zone and return at once.
Intake: ``submit`` does a ``send_nowait`` on a memory channel sized from the host's
maximum number of zones (the manager refuses registrations beyond that bound, so the
channel cannot be full); it never blocks and never fails.
What it owns: each ``DefunctZone`` from the moment it is sent. Per zone it runs
``bundle`` (cause ``terminated_instance`` or whatever the sender said) and, as soon as the
bundle has released the zone (end of phase 1) or bundling has failed for good,
``halt_and_remove``. Both steps are idempotent and retried with backoff; a failed bundle
never prevents teardown; teardown is retried until it succeeds. Once a zone is halted its
NIC reservations are released.
On cancellation: work in progress stops where it is; the zone stays on disk and the
next start's sweep hands it to the reaper again (cause ``unexpected_zone``). The agent
gives the reaper a shielded drain deadline before cancelling it (``drain``).
"""

from __future__ import annotations

import collections
import datetime as dt
import enum
from collections.abc import Awaitable, Callable

import attrs
import structlog
import trio

from ._backoff import retry
from ._bundler import ZoneBundler
from ._config import BackoffPolicy
from ._host import DefunctZone, Snapshot, Zone, ZoneBackend
from ._nics import NicReservations
from ._wire import ZoneBundleCause, utcnow

log = structlog.get_logger("sledagent.reaper")


class ReaperStep(enum.StrEnum):
    QUEUED = "queued"
    BUNDLING = "bundling"  # phase 1: the zone is held
    ARCHIVING = "archiving"  # phase 2: zone released, archive being written
    HALTING = "halting"  # zone being halted (phase 2 may still be running: see `archiving`)


@attrs.define
class ReaperItem:
    """What the reaper holds for one zone (shown by ``GET /zones/cleanup``)."""

    defunct: DefunctZone
    step: ReaperStep = ReaperStep.QUEUED
    since: dt.datetime = attrs.field(factory=utcnow)
    archiving: bool = False
    bundle_attempts: int = 0
    bundle_error: str | None = None
    halt_attempts: int = 0
    halt_error: str | None = None


@attrs.frozen
class ReaperStatistics:
    held: int
    reaped: int
    bundles_failed: int
    halt_retries: int


class Reaper:
    def __init__(
        self,
        backend: ZoneBackend,
        bundler: ZoneBundler,
        nics: NicReservations,
        *,
        capacity: int,
        backoff: BackoffPolicy,
        bundle_attempts: int,
        teardown_concurrency: int,
        bundle: bool = True,
        publications_settled: Callable[[], Awaitable[None]] | None = None,
        publish_first_s: float = 0.0,
    ) -> None:
        self._backend = backend
        self._bundler = bundler
        self._nics = nics
        self._backoff = backoff
        self._bundle_attempts = bundle_attempts
        self._bundle = bundle
        self._publications_settled = publications_settled
        self._publish_first_s = publish_first_s
        self._teardown_limiter = trio.CapacityLimiter(teardown_concurrency)
        self._send, self._recv = trio.open_memory_channel[DefunctZone](capacity)
        # Only if the capacity accounting were wrong: never block, never drop.
        self._overflow: collections.deque[DefunctZone] = collections.deque()
        self._in_transit = 0
        self._held: dict[str, ReaperItem] = {}
        self._idle = trio.Event()
        self._idle.set()
        self._reaped = self._bundles_failed = self._halt_retries = 0

    # --- intake (called by runners, the manager and the startup sweep) ---------------

    def submit(self, defunct: DefunctZone) -> None:
        """Take ownership of ``defunct``; returns at once, never fails."""
        self._in_transit += 1
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        try:
            self._send.send_nowait(defunct)
        except (trio.WouldBlock, trio.ClosedResourceError):
            log.error("reaper_intake_overflow", zone_name=defunct.zone.name)
            self._overflow.append(defunct)

    @property
    def backlog(self) -> int:
        """Zones sent to the reaper and not yet torn down."""
        return self._in_transit + len(self._held)

    def holdings(self) -> list[ReaperItem]:
        return [attrs.evolve(item) for item in self._held.values()]

    def statistics(self) -> ReaperStatistics:
        return ReaperStatistics(
            held=self.backlog,
            reaped=self._reaped,
            bundles_failed=self._bundles_failed,
            halt_retries=self._halt_retries,
        )

    async def wait_idle(self) -> None:
        """Return once every zone received so far has been torn down."""
        while not self._idle.is_set():
            await self._idle.wait()

    async def recover(self, snapshot: Snapshot) -> None:
        """Finish a bundle a crash cut short, from its snapshot (``ZoneBundler.recover``).

        Held like a zone meanwhile (``GET /zones/cleanup`` shows it archiving, and
        ``wait_idle`` waits for it): the start's recovery runs while the agent serves."""
        key = f"snapshot:{snapshot.bundle_id}"
        zone = Zone(snapshot.zone_name, None, "")
        self._held[key] = ReaperItem(
            DefunctZone(zone, ZoneBundleCause.OTHER, utcnow()),
            step=ReaperStep.ARCHIVING,
            archiving=True,
        )
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        try:
            await self._bundler.recover(snapshot)
        finally:
            del self._held[key]
            self._check_idle()

    # --- the service -----------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Receive defunct zones and reap each in its own task until cancelled."""
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                while self._overflow:
                    nursery.start_soon(self._reap, self._overflow.popleft())
                defunct = await self._recv.receive()
                nursery.start_soon(self._reap, defunct)

    async def _reap(self, defunct: DefunctZone) -> None:
        name = defunct.zone.name
        self._in_transit -= 1
        if name in self._held:  # already being reaped (e.g. found again by a sweep)
            self._check_idle()
            return
        item = self._held[name] = ReaperItem(defunct)
        bound = log.bind(zone_name=name, cause=defunct.cause.value)
        bound.info("zone_received")
        try:
            if self._publications_settled is not None and self._publish_first_s > 0:
                # Publishing first: in a mass stop, bundling competes with the
                # deliveries to Nexus for this process's CPU. Deliveries backing off
                # (Nexus down) do not count; a slow Nexus holds bundling back at most
                # publish_first_s.
                with trio.move_on_after(self._publish_first_s):
                    await self._publications_settled()
            released = trio.Event()
            async with trio.open_nursery() as nursery:
                if self._bundle:
                    nursery.start_soon(self._bundle_step, item, released, bound)
                else:
                    released.set()
                await released.wait()
                await self._teardown_step(item, bound)
            self._reaped += 1
            bound.info("zone_reaped")
        finally:
            del self._held[name]
            self._check_idle()

    def _check_idle(self) -> None:
        if self.backlog == 0:
            self._idle.set()

    async def _bundle_step(
        self, item: ReaperItem, released: trio.Event, bound: structlog.typing.FilteringBoundLogger
    ) -> None:
        def on_released() -> None:
            item.step = ReaperStep.ARCHIVING
            item.archiving = True
            released.set()

        def on_error(attempt: int, exc: Exception) -> None:
            item.bundle_attempts = attempt
            item.bundle_error = repr(exc)
            if released.is_set():  # phase 2 failed: the zone may be gone, stop retrying
                raise exc

        item.step = ReaperStep.BUNDLING
        try:
            await retry(
                lambda: self._bundler.create(
                    item.defunct.zone, item.defunct.cause, on_released=on_released
                ),
                backoff=self._backoff,
                attempts=self._bundle_attempts,
                log=bound,
                event="bundle_retry",
                on_error=on_error,
            )
        except Exception as exc:
            self._bundles_failed += 1
            bound.error("bundle_abandoned", error=repr(exc), attempts=item.bundle_attempts)
        finally:
            item.archiving = False
            released.set()  # whatever happened, the zone may now be torn down

    async def _teardown_step(
        self, item: ReaperItem, bound: structlog.typing.FilteringBoundLogger
    ) -> None:
        zone = item.defunct.zone

        def on_error(attempt: int, exc: Exception) -> None:
            item.halt_attempts = attempt
            item.halt_error = repr(exc)
            self._halt_retries += 1

        async def halt() -> None:
            async with self._teardown_limiter:
                await self._backend.halt_and_remove(zone)

        item.step = ReaperStep.HALTING
        await retry(
            halt,
            backoff=self._backoff,
            attempts=None,
            log=bound,
            event="halt_retry",
            on_error=on_error,
        )
        self._nics.release(zone.name)
        bound.info("zone_halted")
