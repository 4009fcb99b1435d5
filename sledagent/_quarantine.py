"""The quarantine: files in a debug directory that are not whole bundles, moved aside.

A file under a debug directory that is not a whole bundle (``_bundle_check``: unreadable,
truncated, misnamed, not a regular file) is renamed to
``<debug_dir>/.quarantine/<its path relative to the debug dir>`` (``.1``, ``.2``...
appended when that name is taken): the same filesystem, so the move is atomic and copies
nothing. The bundle index never reads the quarantine; utilization counts it; cleanup
removes it before any bundle. omicron counts such files in its usage but never removes
them (the TODO-robustness in its ``enumerate_zone_bundles``), so its quota can be filled
by files no listing shows.

Why each file is there is kept in a small JSON record beside the cleanup context, outside
the debug directories, so that their usage is exactly what is in them. A file in the
quarantine with no record (moved there by hand, or a crash between the move and the
record's write) is listed with the reason ``"no record"``.
"""

from __future__ import annotations

import datetime as dt
import os
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

import attrs
import msgspec
import structlog
import trio

from ._archive import BUNDLE_SUFFIX
from ._wire import QuarantinedFile, utcnow

log = structlog.get_logger("sledagent.store")

QUARANTINE_DIR = ".quarantine"
NO_RECORD = "no record"


@attrs.frozen
class Record:
    original_path: str
    reason: str
    time_quarantined: dt.datetime


def move_to_quarantine(debug_dir: Path, path: Path) -> Path:
    """Rename ``path`` (under ``debug_dir``) into the quarantine; returns its new path.
    ``FileNotFoundError`` if it is gone. Blocking; the caller serializes moves (the free
    name is chosen before the rename)."""
    rel = path.relative_to(debug_dir)
    target = debug_dir / QUARANTINE_DIR / rel
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # a file holds that directory's name
        target = debug_dir / QUARANTINE_DIR / "__".join(rel.parts)
    base, n = target, 0
    while os.path.lexists(target):
        n += 1
        target = base.with_name(f"{base.name}.{n}")
    os.rename(path, target)
    return target


def original_of(debug_dir: Path, quarantined: Path) -> str:
    """Where a quarantined file with no record was found, as far as its name tells."""
    rel = quarantined.relative_to(debug_dir / QUARANTINE_DIR)
    return str(debug_dir / rel)


def listed(
    debug_dir: Path,
    path: str,
    size: int,
    ctime: float,
    record: Record | None,
) -> QuarantinedFile:
    if record is None:
        return QuarantinedFile(
            debug_dir=str(debug_dir),
            path=path,
            original_path=original_of(debug_dir, Path(path)),
            bytes=size,
            reason=NO_RECORD,
            time_quarantined=dt.datetime.fromtimestamp(ctime, dt.UTC),
        )
    return QuarantinedFile(
        debug_dir=str(debug_dir),
        path=path,
        original_path=record.original_path,
        bytes=size,
        reason=record.reason,
        time_quarantined=record.time_quarantined,
    )


def load_records(path: Path) -> dict[str, Record]:
    """The records (by quarantined path); none if the file is absent or unreadable."""
    try:
        return msgspec.json.decode(path.read_bytes(), type=dict[str, Record])
    except FileNotFoundError:
        return {}
    except (OSError, msgspec.DecodeError) as exc:  # a bad file must not stop the agent
        log.error("quarantine_record_unreadable", path=str(path), error=str(exc))
        return {}


def save_records(path: Path, records: dict[str, Record]) -> None:
    """Write the records atomically (temporary name, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(msgspec.json.encode(records))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Quarantine:
    """What is in each debug directory's quarantine, and why (the store's; not
    thread-safe: used from the trio thread, blocking work in worker threads).

    ``refresh`` takes what a walk saw there; ``move`` puts a file there; ``drop``
    forgets files removed; ``flush`` writes the records if they changed."""

    def __init__(self, debug_dirs: Sequence[Path], record_path: Path) -> None:
        self.record_path = record_path
        self.items: dict[str, dict[str, QuarantinedFile]] = {str(d): {} for d in debug_dirs}
        self.moved = 0  # files moved here since start
        self._records: dict[str, Record] = {}
        self._saved: dict[str, Record] = {}
        self._move_lock = trio.Lock()  # a free name is chosen, then renamed to

    async def load(self) -> None:
        self._records = await trio.to_thread.run_sync(load_records, self.record_path)
        self._saved = dict(self._records)

    def all(self) -> list[QuarantinedFile]:
        """Every quarantined file, oldest first."""
        found = [q for d in self.items.values() for q in d.values()]
        return sorted(found, key=lambda q: (q.time_quarantined, q.path))

    def refresh(self, debug_dir: Path, seen: Iterable[tuple[str, int, float]]) -> None:
        """The quarantine as a walk saw it (path, size, ctime), plus what was moved
        there since the walk."""
        now = {
            path: listed(debug_dir, path, size, ctime, self._records.get(path))
            for path, size, ctime in seen
        }
        for path, item in self.items[str(debug_dir)].items():
            now.setdefault(path, item)
        self.items[str(debug_dir)] = now

    async def move(self, debug_dir: Path, path: str, size: int, reason: str) -> bool:
        """Move ``path`` into the quarantine, recording why; ``False`` if it is gone or
        cannot be moved (logged: it stays counted where it is, tried at the next scan)."""
        async with self._move_lock:
            try:
                moved = await trio.to_thread.run_sync(move_to_quarantine, debug_dir, Path(path))
            except FileNotFoundError:
                return False
            except OSError as exc:
                log.error("quarantine_failed", path=path, reason=reason, error=str(exc))
                return False
        record = Record(path, reason, utcnow())
        self._records[str(moved)] = record
        self.items[str(debug_dir)][str(moved)] = listed(debug_dir, str(moved), size, 0.0, record)
        self.moved += 1
        log.warning(
            "bundle_quarantined", path=path, quarantined_as=str(moved), bytes=size, reason=reason
        )
        return True

    def of_bundle(self, zone_name: str, bundle_id: uuid.UUID) -> list[QuarantinedFile]:
        """The quarantined files that were found as this bundle's file."""
        name = os.path.join(zone_name, f"{bundle_id}{BUNDLE_SUFFIX}")
        return [
            q
            for d, items in self.items.items()
            for q in items.values()
            if q.original_path == os.path.join(d, name)
        ]

    def drop(self, items: Iterable[QuarantinedFile]) -> None:
        for q in items:
            self.items[q.debug_dir].pop(q.path, None)
            self._records.pop(q.path, None)

    async def flush(self) -> None:
        """Persist the records of the files in quarantine (dropping the others), if
        they changed since last written."""
        present = {p for q in self.items.values() for p in q}
        records = {p: r for p, r in self._records.items() if p in present}
        self._records = records
        if records == self._saved:
            return
        try:
            await trio.to_thread.run_sync(save_records, self.record_path, records)
            self._saved = dict(records)
        except OSError as exc:  # the reasons only; the files are handled
            log.error("quarantine_record_unwritable", path=str(self.record_path), error=str(exc))
