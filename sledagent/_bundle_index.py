"""DiskIndex: the index of the bundle files in the debug directories, and the scan.

The base of ``DiskBundleStore`` (``_bundle_store``): the walk of every file under each
debug directory (``_bundle_scan``), the check of each file the index does not know
(``_bundle_check``), and what follows from it: a whole bundle is indexed, anything else
is moved to the quarantine (``_quarantine``), a stale temporary bundle file is removed,
and what cannot be put right is reported (``_bundle_debris``). A scan of one zone's
directories (``look_on_disk``) lets a request naming a bundle added since the last scan
see it at once.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

import attrs
import structlog
import trio

from ._archive import IN_PROGRESS, TempFilesInProgress
from ._bundle_debris import Debris
from ._bundle_scan import Checked, DirScan, Found, Verdict, check, temp_name, walk
from ._host import BundleInfo
from ._quarantine import Quarantine
from ._store import MemoryBundleStore

log = structlog.get_logger("sledagent.store")
_Key = tuple[str, uuid.UUID]


class DiskIndex(MemoryBundleStore):
    """The in-memory index of ``_store``, kept from the files of the debug dirs."""

    def __init__(
        self,
        debug_dirs: Sequence[Path],
        *,
        record_path: Path,
        check_concurrency: int = 2,
        in_progress: TempFilesInProgress = IN_PROGRESS,
    ) -> None:
        if not debug_dirs:
            raise ValueError("DiskBundleStore needs at least one debug directory")
        super().__init__()
        self.debug_dirs = [Path(d) for d in debug_dirs]
        #: What is not a whole bundle; why each is there is recorded in ``record_path``
        #: (outside the debug dirs: not counted in their usage).
        self.quarantined = Quarantine(self.debug_dirs, record_path)
        #: The temporary bundle files this agent's archives are writing now; any other
        #: file with that name is stale, and removed by the scan.
        self.in_progress = in_progress
        #: What a scan could not put right: stale temporary files it could not remove,
        #: directories it could not list (each logged once, reported).
        self.debris = Debris(self.debug_dirs)
        self._files: dict[str, tuple[_Key, int]] = {}  # indexed path -> (bundle, size)
        self._scan_lock = trio.Lock()  # one scan (or cleanup) at a time
        self._check_limiter = trio.CapacityLimiter(check_concurrency)
        self._removing: set[str] = set()  # paths being unlinked: not new files
        self._deleted: set[_Key] | None = None  # deleted while a scan runs

    # --- the scan -----------------------------------------------------------------------

    async def _scan_locked(self) -> list[DirScan]:
        """Walk every debug directory; index the whole bundles the index lacks, forget
        the ones whose file is gone, quarantine everything else. Holds ``_scan_lock``."""
        self._deleted = set()
        try:
            scans = [await self._scan_dir(d) for d in self.debug_dirs]
        finally:
            self._deleted = None
        await self.quarantined.flush()
        return scans

    async def _scan_dir(self, d: Path, top: Path | None = None) -> DirScan:
        """Scan ``d`` (or only its directory ``top``, e.g. one zone's)."""
        scan = await trio.to_thread.run_sync(walk, d, top)
        root = top if top is not None else d
        known = {p for p in self._files if under(p, root)}
        seen = {f.path for f in scan.files}
        for path in known - seen:  # removed behind our back: the files are the truth
            if path not in self._removing and self._forget_path(path):
                log.warning("bundle_file_vanished", path=path)
        scan = await self._remove_stale(d, scan)
        todo = [
            f
            for f in scan.files
            if f.path not in self._removing
            and not temp_name(d, f.path)
            and self._files.get(f.path, (None, -1))[1] != f.size
        ]
        for checked in await self._check_all(d, todo):
            await self._apply(d, checked)
        if top is None:
            self.quarantined.refresh(d, ((f.path, f.size, f.ctime) for f in scan.quarantined))
            self.debris.unreadable_now(d, scan.unreadable)
        return scan

    async def _remove_stale(self, d: Path, scan: DirScan) -> DirScan:
        """Remove the temporary bundle files no archive of this agent is writing (what
        the startup sweep removes); the scan without them. One that cannot be removed
        stays counted, and is logged once."""
        stale = [
            f
            for f in scan.files
            if temp_name(d, f.path) and f.path not in self.in_progress
            and f.path not in self._removing
        ]  # fmt: skip
        if not stale:
            return scan
        failed = await trio.to_thread.run_sync(_unlink_all, [f.path for f in stale])
        self.debris.stale_removed(d, stale, failed)
        gone = {f.path for f in stale} - set(failed)
        return attrs.evolve(scan, files=tuple(f for f in scan.files if f.path not in gone))

    async def look_on_disk(self, zone_name: str) -> None:
        """Scan one zone's directories now: a request naming a bundle the index does
        not have sees a file put there since the last scan (indexed or quarantined)."""
        if not zone_name or zone_name.startswith(".") or os.sep in zone_name:
            return  # not a zone's directory (the quarantine is ".quarantine")
        async with self._scan_lock:
            self._deleted = set()
            try:
                for d in self.debug_dirs:
                    await self._scan_dir(d, d / zone_name)
            finally:
                self._deleted = None
            await self.quarantined.flush()

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

    def _dir_of(self, path: str) -> Path:
        for d in self.debug_dirs:
            if under(path, d):
                return d
        return Path(path).parent.parent  # not under any: judged where it lies

    def _in_dir(self, debug_dir: Path) -> list[BundleInfo]:
        out = []
        for b in self.index.list_all():
            mine = tuple(p for p in b.paths if under(p, debug_dir))
            if mine:
                out.append(attrs.evolve(b, paths=mine))
        return out


def under(path: str, debug_dir: Path) -> bool:
    return path.startswith(str(debug_dir) + os.sep)


def _unlink_all(paths: Sequence[str]) -> dict[str, str]:
    """Remove each file; those that could not be (path -> why). Blocking."""
    failed = {}
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass
        except OSError as exc:
            failed[p] = exc.strerror or str(exc)
    return failed
