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
from pathlib import Path

import attrs
import msgspec
import structlog

from ._wire import QuarantinedFile

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
