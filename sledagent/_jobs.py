"""BundleJobs: explicit bundles of live zones, as asynchronous jobs.

omicron removed explicit bundles of live zones because of its global mutex; with no
global lock, we can afford them. Who starts it: the ``SledAgent``. What it owns: one task
per job in its nursery. A job is ``queued`` until a phase-1 slot is free, ``collecting``
while it holds the zone, ``archiving`` once the zone is released, then ``done`` (with the
bundle's metadata) or ``failed`` (with the error). Cause: ``other``. On cancellation
(shutdown) jobs stop; the bundler drops their snapshots (shielded).
"""

from __future__ import annotations

import collections
import datetime as dt
import enum
import uuid
from collections.abc import Callable

import attrs
import structlog
import trio

from ._bundler import ZoneBundler
from ._errors import NoSuchBundleJob, NoSuchZone
from ._host import Zone
from ._wire import ZoneBundleCause, ZoneBundleMetadata, utcnow

log = structlog.get_logger("sledagent.jobs")


class BundleJobState(enum.StrEnum):
    QUEUED = "queued"
    COLLECTING = "collecting"
    ARCHIVING = "archiving"
    DONE = "done"
    FAILED = "failed"


@attrs.define
class BundleJob:
    job_id: uuid.UUID
    zone_name: str
    state: BundleJobState = BundleJobState.QUEUED
    time_created: dt.datetime = attrs.field(factory=utcnow)
    bundle: ZoneBundleMetadata | None = None
    error: str | None = None


class BundleJobs:
    _KEEP = 1024  # finished jobs remembered, oldest forgotten first

    def __init__(self, bundler: ZoneBundler, find_zone: Callable[[str], Zone | None]) -> None:
        self._bundler = bundler
        self._find_zone = find_zone
        self._jobs: collections.OrderedDict[uuid.UUID, BundleJob] = collections.OrderedDict()
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def create(self, zone_name: str) -> BundleJob:
        """Start bundling a live zone; raises ``NoSuchZone``."""
        zone = self._find_zone(zone_name)
        if zone is None:
            raise NoSuchZone(f"no live zone named {zone_name!r} on this sled")
        if self._nursery is None:
            raise RuntimeError("BundleJobs.create() before run() started")
        job = BundleJob(job_id=uuid.uuid4(), zone_name=zone_name)
        self._jobs[job.job_id] = job
        while len(self._jobs) > self._KEEP:
            self._jobs.popitem(last=False)
        self._nursery.start_soon(self._run_job, job, zone)
        return job

    def get(self, job_id: uuid.UUID) -> BundleJob:
        try:
            return self._jobs[job_id]
        except KeyError:
            raise NoSuchBundleJob(f"no bundle job {job_id}") from None

    async def _run_job(self, job: BundleJob, zone: Zone) -> None:
        def collecting() -> None:
            job.state = BundleJobState.COLLECTING

        def released() -> None:
            job.state = BundleJobState.ARCHIVING

        try:
            info = await self._bundler.create(
                zone, ZoneBundleCause.OTHER, on_collecting=collecting, on_released=released
            )
        except Exception as exc:
            job.state, job.error = BundleJobState.FAILED, repr(exc)
            log.warning("bundle_job_failed", job_id=str(job.job_id), error=repr(exc))
            return
        job.state, job.bundle = BundleJobState.DONE, info.metadata
