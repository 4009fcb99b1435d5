"""What a bundle-store scan found and could not put right, reported rather than hidden.

Two kinds (issue 15, "a bundle store with nothing hidden"):

- a stale temporary bundle file (``.<bundle_id>.tar.gz.tmp`` that no archive of this agent
  is writing): the scan removes it, as the startup sweep does; one it cannot remove (no
  permission on its directory) stays counted in ``bytes_used`` and is logged once;
- a directory under a debug directory that cannot be listed (``chmod 000``): its files can
  be neither counted nor moved, so it is listed with the quarantine (``bytes`` 0, the
  reason saying its size is unknown) and exported as ``sledagent_bundle_unreadable_dirs``.

Each is logged when it appears and when it goes, never at every scan.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import structlog

from ._wire import QuarantinedFile, utcnow

log = structlog.get_logger("sledagent.store")


class _File(Protocol):
    @property
    def path(self) -> str: ...

    @property
    def size(self) -> int: ...


def unreadable_reason(why: str) -> str:
    return f"unreadable directory, its files not counted (size unknown): {why}"


class Debris:
    """Per debug directory: the unreadable directories (path -> (why, since)), and the
    stale temporary files that could not be removed. Used from the trio thread."""

    def __init__(self, debug_dirs: Sequence[Path]) -> None:
        self.unreadable: dict[str, dict[str, tuple[str, dt.datetime]]] = {
            str(d): {} for d in debug_dirs
        }
        self.stale_removed_count = 0  # since start
        self._unremovable: dict[str, set[str]] = {str(d): set() for d in debug_dirs}

    def unreadable_now(self, debug_dir: Path, now: Mapping[str, str]) -> None:
        """What a whole walk of ``debug_dir`` could not list (path -> why)."""
        before = self.unreadable[str(debug_dir)]
        after = {}
        for path, why in now.items():
            if path in before and before[path][0] == why:
                after[path] = before[path]
                continue
            after[path] = (why, utcnow())
            log.error("debug_dir_unreadable", path=path, error=why, bytes_used="unknown")
        for path in before.keys() - now.keys():
            log.info("debug_dir_readable_again", path=path)
        self.unreadable[str(debug_dir)] = after

    def listed(self) -> list[QuarantinedFile]:
        """The unreadable directories, as quarantine listing entries (size unknown: 0)."""
        return [
            QuarantinedFile(
                debug_dir=d,
                path=path,
                original_path=path,
                bytes=0,
                reason=unreadable_reason(why),
                time_quarantined=since,
            )
            for d, items in self.unreadable.items()
            for path, (why, since) in sorted(items.items())
        ]

    def stale_removed(
        self, debug_dir: Path, stale: Sequence[_File], failed: Mapping[str, str]
    ) -> None:
        """``stale`` temporary files were removed, but for ``failed`` (path -> why)."""
        for f in stale:
            if f.path not in failed:
                self.stale_removed_count += 1
                log.warning(
                    "bundle_temp_file_stale_removed",
                    path=f.path,
                    bytes=f.size,
                    why="no archive of this agent is writing it",
                )
        known = self._unremovable[str(debug_dir)]
        for path, why in failed.items():
            if path not in known:
                log.error("bundle_temp_file_stale_unremovable", path=path, error=why)
        self._unremovable[str(debug_dir)] = set(failed)
