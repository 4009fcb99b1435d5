"""DiskBundleStore: the bundles in the debug directories, indexed in memory.

The files are the truth, and nothing in a debug directory is hidden. A scan walks every
file under each debug directory (``_bundle_scan``): at start, at every cleanup (periodic
or requested), and for every utilization or quarantine request. A file the index does
not know (or whose size changed) is checked (``_bundle_check``: its ``metadata.toml``,
the first member, and the end of its gzip stream): a whole bundle is indexed, anything
else is moved to ``<debug_dir>/.quarantine/`` (``_quarantine``), where it is counted,
listed, exported as a metric and removed first by cleanup. A bundle about to be served
is checked again (``get_verified``): a copy that is no longer whole is quarantined, and
with no whole copy left the answer is 404, what a client takes as "no such bundle".

Between scans, listing never opens a bundle, and no operation waits for a bundle being
written (they are added when complete; their temporary files are counted, never moved).

Retention (``_retention``): utilization and cleanup are per debug directory, as in
omicron; the cleanup context is validated, persisted next to the data (omicron loses it on
restart) and takes effect at once, including on the period of the running cleanup task.
"""

from __future__ import annotations

import os
import shutil
import tomllib
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

import attrs
import msgspec
import structlog
import trio
from trio_util import AsyncValue

from ._bundle_scan import (
    Checked,
    DirScan,
    Found,
    Verdict,
    check,
    check_copy,
    in_progress,
    walk,
)
from ._codec import convert
from ._errors import NotFound
from ._host import BundleInfo, StoreStatistics
from ._quarantine import Quarantine
from ._retention import DEFAULT_CONTEXT, apply_update, bytes_available, plan_cleanup
from ._retention import validate_context as _validate
from ._store import MemoryBundleStore
from ._wire import (
    BundleUtilization,
    CleanupContext,
    CleanupContextUpdate,
    CleanupCount,
    QuarantinedFile,
)

log = structlog.get_logger("sledagent.store")
_Key = tuple[str, uuid.UUID]


class DiskBundleStore(MemoryBundleStore):
    """The index-backed store of ``_store``, whose bundles are files in debug dirs."""

    def __init__(
        self,
        debug_dirs: Sequence[Path],
        *,
        context_path: Path,
        quota_bytes: int | None = None,
        check_concurrency: int = 2,
    ) -> None:
        if not debug_dirs:
            raise ValueError("DiskBundleStore needs at least one debug directory")
        self.debug_dirs = [Path(d) for d in debug_dirs]
        self.context_path = Path(context_path)
        self.quota_bytes = quota_bytes
        #: What is not a whole bundle; why each is there is recorded beside the context
        #: (outside the debug dirs: not counted in their usage).
        self.quarantined = Quarantine(
            self.debug_dirs, self.context_path.with_name("bundle-quarantine.json")
        )
        super().__init__()
        #: How many periodic cleanups have run (lets a caller wait for the next one).
        self.cleanup_runs = AsyncValue(0)
        self._files: dict[str, tuple[_Key, int]] = {}  # indexed path -> (bundle, size)
        self._scan_lock = trio.Lock()  # one scan (or cleanup) at a time
        self._check_limiter = trio.CapacityLimiter(check_concurrency)
        self._removing: set[str] = set()  # paths being unlinked: not new files
        self._deleted: set[_Key] | None = None  # deleted while a scan runs

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

    # --- the scan -----------------------------------------------------------------------

    async def _scan_locked(self) -> list[DirScan]:
        """Walk every debug directory; index the whole bundles the index lacks, forget
        the ones whose file is gone, quarantine everything else. Holds ``_scan_lock``."""
        self._deleted = set()
        scans = []
        try:
            for d in self.debug_dirs:
                known = {p for p in self._files if _under(p, d)}
                scan = await trio.to_thread.run_sync(walk, d)
                seen = {f.path for f in scan.files}
                for path in known - seen:  # removed behind our back: the files are the truth
                    if path not in self._removing and self._forget_path(path):
                        log.warning("bundle_file_vanished", path=path)
                todo = [
                    f
                    for f in scan.files
                    if f.path not in self._removing
                    and not in_progress(d, f.path)
                    and self._files.get(f.path, (None, -1))[1] != f.size
                ]
                for checked in await self._check_all(d, todo):
                    await self._apply(d, checked)
                self.quarantined.refresh(d, ((f.path, f.size, f.ctime) for f in scan.quarantined))
                scans.append(scan)
        finally:
            self._deleted = None
        await self.quarantined.flush()
        return scans

    async def _check_all(self, debug_dir: Path, todo: list[Found]) -> list[Checked]:
        results: list[Checked] = []

        async def one(found: Found) -> None:
            results.append(
                await trio.to_thread.run_sync(check, debug_dir, found, limiter=self._check_limiter)
            )

        async with trio.open_nursery() as nursery:
            for found in todo:
                nursery.start_soon(one, found)
        return sorted(results, key=lambda c: c.found.path)

    async def _apply(self, debug_dir: Path, checked: Checked) -> None:
        path = checked.found.path
        if checked.verdict is Verdict.GONE:
            self._forget_path(path)
        elif checked.verdict is Verdict.CHANGING:
            log.info("bundle_file_changing", path=path)  # judged at the next scan
        elif checked.verdict is Verdict.WHOLE:
            assert checked.metadata is not None
            key = (checked.metadata.id.zone_name, checked.metadata.id.bundle_id)
            if path in self._removing or (self._deleted is not None and key in self._deleted):
                return  # deleted while it was being checked
            self._index_path(BundleInfo(checked.metadata, checked.found.size, (path,)))
        else:
            await self.quarantined.move(debug_dir, path, checked.found.size, checked.reason)
            self._forget_path(path)

    # --- the index of files -------------------------------------------------------------

    def _index_path(self, info: BundleInfo) -> None:
        """Add ``info``'s paths to its bundle's entry (copies found apart are merged)."""
        key = (info.zone_name, info.bundle_id)
        for p in info.paths:
            self._files[p] = (key, info.size)
        known = self.index.get(*key)
        if known is None:
            self.index.add(info)
        else:
            paths = (*known.paths, *(p for p in info.paths if p not in known.paths))
            self.index.add(attrs.evolve(known, paths=paths))

    def _forget_path(self, path: str) -> bool:
        """Drop one copy from the index (the bundle with its last copy); whether known."""
        entry = self._files.pop(path, None)
        if entry is None:
            return False
        known = self.index.get(*entry[0])
        if known is not None:
            left = tuple(p for p in known.paths if p != path)
            if left:
                self.index.add(attrs.evolve(known, paths=left))
            else:
                self.index.remove(*entry[0])
        return True

    async def _unlink(self, paths: Iterable[str]) -> None:
        paths = list(paths)
        self._removing.update(paths)
        try:
            await trio.to_thread.run_sync(_unlink_all, paths)
        finally:
            self._removing.difference_update(paths)

    # --- BundleStore --------------------------------------------------------------------

    async def add(self, info: BundleInfo) -> None:
        self._index_path(info)

    async def get_verified(self, zone_name: str, bundle_id: uuid.UUID) -> BundleInfo | None:
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
        async with self._scan_lock:
            await self._scan_locked()
        return self.quarantined.all()

    def statistics(self) -> StoreStatistics:
        items = self.quarantined.items
        return StoreStatistics(
            quarantine_files={d: len(q) for d, q in items.items()},
            quarantine_bytes={d: sum(i.bytes for i in q.values()) for d, q in items.items()},
            quarantined=self.quarantined.moved,
        )

    # --- retention ----------------------------------------------------------------------

    def _dir_of(self, path: str) -> Path:
        for d in self.debug_dirs:
            if _under(path, d):
                return d
        return Path(path).parent.parent  # not under any: judged where it lies

    def _in_dir(self, debug_dir: Path) -> list[BundleInfo]:
        out = []
        for b in self.index.list_all():
            mine = tuple(p for p in b.paths if _under(p, debug_dir))
            if mine:
                out.append(attrs.evolve(b, paths=mine))
        return out

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
                plan = plan_cleanup(
                    self._in_dir(d),
                    bytes_available=bytes_available(quota, ctx.storage_limit),
                    priority=ctx.priority,
                    quarantined=self.quarantined.items[str(d)].values(),
                    bytes_used=scan.bytes_used,
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


def _under(path: str, debug_dir: Path) -> bool:
    return path.startswith(str(debug_dir) + os.sep)


def _not_whole(zone_name: str, bundle_id: uuid.UUID, q: QuarantinedFile) -> str:
    return (
        f"no whole bundle {bundle_id} for zone {zone_name}: it is in quarantine "
        f"({q.reason}), see GET /zones/bundle-cleanup/quarantine"
    )


def _unlink_all(paths: Sequence[str]) -> None:
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass
