"""Snapshots of a local zone's logs: ``<snapshots>/<bundle_id>/``, tagged with
``.zone-bundle-snapshot`` (so the startup sweep finds leftovers).

Rotated and archived files are immutable and hard-linked; the live log is linked and its
length now noted (phase 2 archives bytes up to it), or across filesystems its newest
bytes copied, size-capped. A snapshot is built under ``.creating-<id>`` and renamed whole;
it is removed by a rename to ``.removing-<id>`` first: a kill at any point leaves either
a whole tagged snapshot or a tree whose prefix says it is ours to delete, never an
untagged one the sweep must keep (a crash drill found one: docs/reliability.md).

Blocking filesystem work: callers run these in worker threads.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import structlog

from ._host import LogSource, Snapshot
from ._logwriter import SERVICE_LOG
from ._seed import link_or_copy

log = structlog.get_logger("sledagent.zones.local")

SNAPSHOT_TAG = ".zone-bundle-snapshot"
_CREATING = ".creating-"
_REMOVING = ".removing-"


def make_snapshot(
    snapshots: Path, zone_name: str, bundle_id: uuid.UUID, log_dirs: Sequence[Path], cap: int
) -> Snapshot:
    """Snapshot the service log files of ``log_dirs`` (the live directory first, then
    the archive: only rotated names are taken from the archive)."""
    snap_dir = snapshots / str(bundle_id)
    work = snapshots / f"{_CREATING}{bundle_id}"
    work.mkdir(parents=True)
    tag = {"zone_name": zone_name, "bundle_id": str(bundle_id), "created": time.time()}
    files: list[LogSource] = []
    try:
        (work / SNAPSHOT_TAG).write_text(json.dumps(tag))
        live, *archives = log_dirs
        sources = sorted(live.glob(f"{SERVICE_LOG}*"))
        for archive in archives:
            sources += sorted(archive.glob(f"{SERVICE_LOG}.*"))
        for src in sources:
            dst = work / src.name
            start = 0
            if src.name != SERVICE_LOG:
                link_or_copy(src, dst)  # rotated / archived: immutable
                size = dst.stat().st_size
            else:
                # The live log is only appended to (rotation renames it): a link and its
                # length now are a snapshot of it, without copying megabytes per zone in
                # phase 1. Phase 2 archives bytes [start, size) only.
                size = _link_or_copy_tail(src, dst, cap)
                start = max(0, size - cap)
            files.append(LogSource(src.name, str(snap_dir / src.name), size, start))
        os.rename(work, snap_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return Snapshot(str(snap_dir), zone_name, bundle_id, tuple(files), _missing(files))


def remove_snapshot(snap_dir: Path) -> None:
    """Rename, then remove (idempotent): a kill midway leaves a ``.removing-`` tree, not
    a snapshot whose tag went first and whose files are nobody's."""
    trash = snap_dir.with_name(f"{_REMOVING}{snap_dir.name}")
    try:
        os.rename(snap_dir, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def sweep_snapshots(snapshots: Path) -> int:
    """Remove every tagged snapshot (and unfinished ones); returns how many tagged."""
    _remove_unfinished(snapshots)
    removed = 0
    for tag in snapshots.glob(f"*/{SNAPSHOT_TAG}"):
        shutil.rmtree(tag.parent, ignore_errors=True)
        removed += 1
    return removed


def leftover_snapshots(snapshots: Path) -> list[Snapshot]:
    """Every whole tagged snapshot a previous run left (unfinished ones are removed; an
    unreadable tag is logged and its snapshot removed: nothing in it can be archived)."""
    _remove_unfinished(snapshots)
    found = []
    for tag_path in sorted(snapshots.glob(f"*/{SNAPSHOT_TAG}")):
        snap_dir = tag_path.parent
        try:
            tag = json.loads(tag_path.read_text())
            zone_name, bundle_id = tag["zone_name"], uuid.UUID(tag["bundle_id"])
        except (OSError, ValueError, KeyError) as exc:
            log.warning("snapshot_tag_unreadable", path=str(snap_dir), error=str(exc))
            shutil.rmtree(snap_dir, ignore_errors=True)
            continue
        files = tuple(
            LogSource(f.name, str(f), f.stat().st_size)
            for f in sorted(snap_dir.iterdir())
            if f.name != SNAPSHOT_TAG and f.is_file()
        )
        found.append(Snapshot(str(snap_dir), zone_name, bundle_id, files, _missing(files)))
    return found


def _remove_unfinished(snapshots: Path) -> None:
    """Snapshots a kill cut short while being made or removed (ours by their prefix)."""
    for prefix in (_CREATING, _REMOVING):
        for path in snapshots.glob(f"{prefix}*"):
            shutil.rmtree(path, ignore_errors=True)


def _missing(files: Sequence[LogSource]) -> tuple[str, ...]:
    """The zone's Propolis service log, if the snapshot has no file of that name: it
    exists from the service's start, so its absence is worth saying in the bundle."""
    return () if any(f.name == SERVICE_LOG for f in files) else (SERVICE_LOG,)


def _link_or_copy_tail(src: Path, dst: Path, cap: int) -> int:
    """Link ``src`` at ``dst`` and return its length now; across filesystems, copy its
    newest ``cap`` bytes (then the copy's length)."""
    try:
        os.link(src, dst)
        return dst.stat().st_size
    except OSError:
        pass
    with open(src, "rb") as f, open(dst, "wb") as out:
        size = os.fstat(f.fileno()).st_size
        if size > cap:
            f.seek(size - cap)
        shutil.copyfileobj(f, out, 1 << 20)
        return out.tell()
