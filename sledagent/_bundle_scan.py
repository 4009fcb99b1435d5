"""What is in a debug directory: every file, and each file's verdict. Blocking (threads).

``walk`` lists every file under a debug directory without following a symbolic link
(one under ``.quarantine/`` apart), with its apparent size: utilization is their sum, as
omicron's (``dir_size``, a walk of the whole directory). ``check`` gives one file's
verdict: a whole bundle, not one (with why: ``_bundle_check``), gone, or still changing
(its size or mtime moved while it was read: a writer is at it, judge it next time).
"""

from __future__ import annotations

import enum
import os
import stat
from pathlib import Path

import attrs
import structlog

from ._archive import TMP_PREFIX, TMP_SUFFIX
from ._bundle_check import NotABundle, check_bundle, copy_ends_whole
from ._quarantine import QUARANTINE_DIR
from ._wire import ZoneBundleMetadata

log = structlog.get_logger("sledagent.store")


@attrs.frozen
class Found:
    """A file (or a link, a socket...: anything but a directory) as the walk saw it."""

    path: str
    size: int
    mtime_ns: int
    ctime: float
    regular: bool


@attrs.frozen
class DirScan:
    debug_dir: Path
    files: tuple[Found, ...]  # outside the quarantine
    quarantined: tuple[Found, ...]  # under <debug_dir>/.quarantine/
    #: Directories that could not be listed (path -> why): their size is unknown.
    unreadable: dict[str, str] = attrs.field(factory=dict)

    @property
    def bytes_used(self) -> int:
        return sum(f.size for f in self.files) + sum(f.size for f in self.quarantined)


def _found(path: str, st: os.stat_result) -> Found:
    return Found(path, st.st_size, st.st_mtime_ns, st.st_ctime, stat.S_ISREG(st.st_mode))


def walk(debug_dir: Path, top: Path | None = None) -> DirScan:
    """Every file under ``debug_dir`` (or only under ``top``, one of its directories);
    a missing directory is empty. A subdirectory that cannot be listed is reported in
    ``unreadable`` (its files cannot be counted or moved; the store says so)."""
    files: list[Found] = []
    quarantined: list[Found] = []
    unreadable: dict[str, str] = {}
    quarantine_root = str(debug_dir / QUARANTINE_DIR)
    stack = [str(top if top is not None else debug_dir)]
    while stack:
        top_dir = stack.pop()
        try:
            entries = list(os.scandir(top_dir))
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as exc:
            unreadable[top_dir] = exc.strerror or str(exc)
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                    continue
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            inside = entry.path.startswith(quarantine_root + os.sep)
            (quarantined if inside else files).append(_found(entry.path, st))
    return DirScan(debug_dir, tuple(files), tuple(quarantined), unreadable)


def temp_name(debug_dir: Path, path: str) -> bool:
    """The archiver's hidden temporary name in a zone directory: a bundle being written
    if an archive of this agent is at it (``_archive.TempFilesInProgress``), else stale
    (removed by the store, and at start by ``sweep_partial``)."""
    p = Path(path)
    name = p.name
    return (
        p.parent.parent == debug_dir and name.startswith(TMP_PREFIX) and name.endswith(TMP_SUFFIX)
    )


class Verdict(enum.Enum):
    WHOLE = "whole"
    BAD = "bad"
    CHANGING = "changing"
    GONE = "gone"


@attrs.frozen
class Checked:
    found: Found
    verdict: Verdict
    metadata: ZoneBundleMetadata | None = None
    reason: str = ""


def stat_path(path: str) -> Found | None:
    try:
        return _found(path, os.lstat(path))
    except FileNotFoundError:
        return None


def check(debug_dir: Path, found: Found) -> Checked:
    """Whether ``found`` is a whole bundle (reading its head, its tail, or all of it)."""
    try:
        meta = check_bundle(Path(found.path), debug_dir)
        verdict = Checked(found, Verdict.WHOLE, meta)
    except FileNotFoundError:
        return Checked(found, Verdict.GONE)
    except NotABundle as exc:
        verdict = Checked(found, Verdict.BAD, reason=str(exc))
    except OSError as exc:  # e.g. no permission to read it: not a bundle we can serve
        verdict = Checked(found, Verdict.BAD, reason=f"unreadable: {exc}")
    now = stat_path(found.path)
    if now is None:
        return Checked(found, Verdict.GONE)
    if (now.size, now.mtime_ns) != (found.size, found.mtime_ns):
        return Checked(now, Verdict.CHANGING)
    return verdict


def check_copy(debug_dir: Path, path: str, size: int) -> Checked:
    """Before serving a copy of an indexed bundle: unchanged in size and ending whole
    (the fast check), or else the full ``check``."""
    found = stat_path(path)
    if found is None:
        return Checked(Found(path, 0, 0, 0.0, False), Verdict.GONE)
    try:
        if copy_ends_whole(Path(path)) == (size, True):
            return Checked(found, Verdict.WHOLE)
    except FileNotFoundError:
        return Checked(found, Verdict.GONE)
    except (NotABundle, OSError):
        pass  # the full check says why
    return check(debug_dir, found)
