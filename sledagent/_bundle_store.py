"""DiskBundleStore: the bundles in the debug directories, indexed in memory.

The files are the truth, and nothing in a debug directory is hidden. A scan
(``_bundle_index``) walks every file under each debug directory (``_bundle_scan``): at
start, at every cleanup (periodic or requested), and for every utilization or quarantine
request; a request naming a bundle the index lacks scans that zone's directories first.
A file the index does not know (or whose size changed) is checked
(``_bundle_check``: its ``metadata.toml``, the first member, and the end of its gzip
stream): a whole bundle is indexed, anything else is moved to
``<debug_dir>/.quarantine/`` (``_quarantine``), where it is counted, listed, exported
as a metric and removed first by cleanup. A bundle about to be served is checked again
(``get_verified``): a copy that is no longer whole is quarantined, and
with no whole copy left the answer is 404, what a client takes as "no such bundle".

Between scans, listing never opens a bundle, and no operation waits for a bundle being
written (they are added when complete; their temporary files are counted, never moved).
A temporary bundle file no archive of this agent is writing is stale: the scan removes
it, as the startup sweep does. Cleanup weighs only what it can remove against the limit:
it never deletes a bundle for bytes it cannot free.

Retention (``_retention``): utilization and cleanup are per debug directory, as in
omicron; the cleanup context is validated, persisted next to the data (omicron loses it on
restart) and takes effect at once, including on the period of the running cleanup task.
"""

from __future__ import annotations

import os
import shutil
import tomllib
import uuid
from collections.abc import Sequence
from pathlib import Path

import attrs
import msgspec
import structlog
import trio
from trio_util import AsyncValue

from ._archive import IN_PROGRESS, TempFilesInProgress
from ._bundle_index import DiskIndex
from ._bundle_scan import Verdict, check_copy
from ._codec import convert
from ._errors import NotFound
from ._host import BundleInfo, StoreStatistics
from ._retention import DEFAULT_CONTEXT, apply_update, bytes_available, plan_cleanup
from ._retention import validate_context as _validate
from ._wire import (
    BundleUtilization,
    CleanupContext,
    CleanupContextUpdate,
    CleanupCount,
    QuarantinedFile,
)

log = structlog.get_logger("sledagent.store")


class DiskBundleStore(DiskIndex):
    """The index-backed store of ``_store``, whose bundles are files in debug dirs."""

    def __init__(
        self,
        debug_dirs: Sequence[Path],
        *,
        context_path: Path,
        quota_bytes: int | None = None,
        check_concurrency: int = 2,
        in_progress: TempFilesInProgress = IN_PROGRESS,
    ) -> None:
        self.context_path = Path(context_path)
        super().__init__(
            debug_dirs,
            record_path=self.context_path.with_name("bundle-quarantine.json"),
            check_concurrency=check_concurrency,
            in_progress=in_progress,
        )
        self.quota_bytes = quota_bytes
        #: How many periodic cleanups have run (lets a caller wait for the next one).
        self.cleanup_runs = AsyncValue(0)

    # --- startup ----------------------------------------------------------------------

    async def open(self) -> None:
        """Load the persisted context and records, then scan (index, quarantine)."""
        self.context.value = await trio.to_thread.run_sync(self._load_context)
        await self.quarantined.load()
        async with self._scan_lock:
            await self._scan_locked()

    def _load_context(self) -> CleanupContext:
        try:
            doc = tomllib.loads(self.context_path.read_text())
            return _validate(convert(doc, CleanupContext))
        except FileNotFoundError:
            return DEFAULT_CONTEXT
        except Exception as exc:  # a bad file must not stop the agent
            log.error("cleanup_context_unreadable", path=str(self.context_path), error=str(exc))
            return DEFAULT_CONTEXT

    # --- BundleStore --------------------------------------------------------------------

    async def add(self, info: BundleInfo) -> None:
        self._index_path(info)

    async def get_verified(self, zone_name: str, bundle_id: uuid.UUID) -> BundleInfo | None:
        info = self.index.get(zone_name, bundle_id)
        if info is None and not self.quarantined.of_bundle(zone_name, bundle_id):
            await self.look_on_disk(zone_name)
            info = self.index.get(zone_name, bundle_id)
        if info is None:
            quarantined = self.quarantined.of_bundle(zone_name, bundle_id)
            if quarantined:
                raise NotFound(_not_whole(zone_name, bundle_id, quarantined[0]))
            return None
        good: list[str] = []
        for path in info.paths:
            debug_dir = self._dir_of(path)
            checked = await trio.to_thread.run_sync(
                check_copy, debug_dir, path, info.size, limiter=self._check_limiter
            )
            if checked.verdict is Verdict.WHOLE:
                good.append(path)
            elif checked.verdict is Verdict.BAD:
                await self.quarantined.move(debug_dir, path, checked.found.size, checked.reason)
                self._forget_path(path)
            elif checked.verdict is Verdict.GONE:
                self._forget_path(path)
        if len(good) < len(info.paths):
            await self.quarantined.flush()
        if not good:
            quarantined = self.quarantined.of_bundle(zone_name, bundle_id)
            if quarantined:
                raise NotFound(_not_whole(zone_name, bundle_id, quarantined[-1]))
            return None
        return attrs.evolve(info, paths=tuple(good))

    async def delete(self, zone_name: str, bundle_id: uuid.UUID) -> bool:
        """Remove every copy, and any quarantined file that was this bundle's."""
        if self.index.get(zone_name, bundle_id) is None and not self.quarantined.of_bundle(
            zone_name, bundle_id
        ):
            await self.look_on_disk(zone_name)
        info = self.index.remove(zone_name, bundle_id)
        quarantined = self.quarantined.of_bundle(zone_name, bundle_id)
        if info is None and not quarantined:
            return False
        if self._deleted is not None:
            self._deleted.add((zone_name, bundle_id))
        paths = info.paths if info is not None else ()
        for p in paths:
            self._files.pop(p, None)
        self.quarantined.drop(quarantined)
        await self._unlink([*paths, *(q.path for q in quarantined)])
        if quarantined:
            await self.quarantined.flush()
        return True

    async def quarantine(self) -> list[QuarantinedFile]:
        """The quarantined files, oldest first, then the directories that cannot be
        listed (``bytes`` 0: their size is unknown), after a scan."""
        async with self._scan_lock:
            await self._scan_locked()
        return [*self.quarantined.all(), *self.debris.listed()]

    def statistics(self) -> StoreStatistics:
        items = self.quarantined.items
        return StoreStatistics(
            quarantine_files={d: len(q) for d, q in items.items()},
            quarantine_bytes={d: sum(i.bytes for i in q.values()) for d, q in items.items()},
            quarantined=self.quarantined.moved,
            unreadable_dirs={d: len(u) for d, u in self.debris.unreadable.items()},
            stale_temp_files_removed=self.debris.stale_removed_count,
        )

    # --- retention ----------------------------------------------------------------------

    def _quota(self, debug_dir: Path) -> int:
        if self.quota_bytes is not None:
            return self.quota_bytes
        return shutil.disk_usage(debug_dir if debug_dir.exists() else debug_dir.parent).total

    async def utilization(self) -> dict[str, BundleUtilization]:
        """Per debug directory: quota, bytes available to bundles, and bytes used by
        every file in it (bundles, quarantine, bundles being written), after a scan."""
        limit = self.context.value.storage_limit
        async with self._scan_lock:
            scans = await self._scan_locked()
        out = {}
        for scan in scans:
            quota = await trio.to_thread.run_sync(self._quota, scan.debug_dir)
            out[str(scan.debug_dir)] = BundleUtilization(
                bytes_available=bytes_available(quota, limit),
                bytes_used=scan.bytes_used,
                dataset_quota=quota,
            )
        return out

    async def cleanup(self) -> dict[str, CleanupCount]:
        """Scan, then delete from each directory, quarantined files first, then the
        lowest-priority bundles, until everything in it fits its limit."""
        ctx = self.context.value
        counts = {}
        async with self._scan_lock:
            scans = await self._scan_locked()
            for scan in scans:
                d = scan.debug_dir
                quota = await trio.to_thread.run_sync(self._quota, d)
                # Only what cleanup can remove is weighed against the limit: a bundle
                # is never deleted for bytes it cannot free (a bundle being written, a
                # file it cannot move or remove): issue 15.
                bundles, items = self._in_dir(d), self.quarantined.items[str(d)].values()
                available = bytes_available(quota, ctx.storage_limit)
                plan = plan_cleanup(
                    bundles, bytes_available=available, priority=ctx.priority, quarantined=items
                )
                removable = sum(b.size for b in bundles) + sum(q.bytes for q in items)
                if scan.bytes_used - plan.bytes_freed > available:
                    log.warning(
                        "cleanup_cannot_free",
                        debug_dir=str(d),
                        bytes_used=scan.bytes_used,
                        bytes_available=available,
                        bytes_not_removable=scan.bytes_used - removable,
                    )
                if plan.quarantined:
                    self.quarantined.drop(plan.quarantined)
                    await self._unlink(q.path for q in plan.quarantined)
                    log.info("quarantine_cleaned", debug_dir=str(d), files=len(plan.quarantined))
                for victim in plan.delete:
                    for p in victim.paths:
                        self._forget_path(p)
                    await self._unlink(victim.paths)
                counts[str(d)] = CleanupCount(bundles=len(plan.delete), bytes=plan.bytes_freed)
                if plan.delete:
                    log.info("bundles_cleaned", debug_dir=str(d), bundles=len(plan.delete))
            await self.quarantined.flush()
        return counts

    async def update_context(self, update: CleanupContextUpdate) -> CleanupContext:
        """Validate, persist and apply; ``BadRequest`` naming the field on bad values."""
        new = apply_update(self.context.value, update)
        await trio.to_thread.run_sync(self._persist_context, new)
        self.context.value = new
        return new

    def _persist_context(self, ctx: CleanupContext) -> None:
        self.context_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.context_path.with_name(self.context_path.name + ".tmp")
        tmp.write_bytes(msgspec.toml.encode(msgspec.to_builtins(ctx)))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.context_path)

    async def run_periodic_cleanup(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Clean up every ``period``; a new period takes effect at once."""
        task_status.started()
        while True:
            period = self.context.value.period.seconds
            with trio.move_on_after(period):
                await self.context.wait_transition()  # period or limit changed: re-arm
                continue
            try:
                await self.cleanup()
            except Exception as exc:  # retried at the next period
                log.error("cleanup_failed", error=repr(exc))
            self.cleanup_runs.value += 1


def _not_whole(zone_name: str, bundle_id: uuid.UUID, q: QuarantinedFile) -> str:
    return (
        f"no whole bundle {bundle_id} for zone {zone_name}: it is in quarantine "
        f"({q.reason}), see GET /zones/bundle-cleanup/quarantine"
    )
