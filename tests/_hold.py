"""Hold an archive job mid-write, for as long as a test needs, whatever the machine's speed.

A job whose snapshot lists a FIFO as a log source blocks when the archiver opens it for
reading (an ``open`` of a FIFO waits for a writer): the bundle's hidden temporary file
exists by then, and the job cannot finish until the test lets it. So a test that cancels
or kills an archive "mid-write" waits for the temporary file to appear, rather than
sleeping and hoping the job is still running (a 64 MiB job takes 0.15 s here when idle,
seconds when loaded).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import trio

from sledagent import ArchiveJob, LogSource
from sledagent._archive import TMP_PREFIX, TMP_SUFFIX


class HeldSource:
    """A FIFO log source: every archive that reads it waits until ``release``."""

    NAME = "held.log"

    def __init__(self, path: Path) -> None:
        os.mkfifo(path)
        self.path = path
        self._writer: int | None = None

    def source(self) -> LogSource:
        return LogSource(self.NAME, str(self.path), 0)

    def add_to(self, job: ArchiveJob) -> ArchiveJob:
        """``job`` with this source first among its files."""
        files = (self.source(), *job.snapshot.files)
        return attrs.evolve(job, snapshot=attrs.evolve(job.snapshot, files=files))

    def release(self) -> None:
        """Let every reader through, now and later: a writer end stays open (O_RDWR
        never blocks on Linux); the readers see an empty file."""
        if self._writer is None:
            self._writer = os.open(self.path, os.O_RDWR | os.O_NONBLOCK)

    def close(self) -> None:
        if self._writer is not None:
            os.close(self._writer)
            self._writer = None


@contextlib.contextmanager
def held_source(path: Path) -> Iterator[HeldSource]:
    """A ``HeldSource`` released (and closed) when the block ends, so that no archive
    thread is left blocked whatever the test's outcome."""
    held = HeldSource(path)
    try:
        yield held
    finally:
        held.release()
        held.close()


def partial_files(*dirs: Path) -> list[Path]:
    """Bundles being written: their hidden temporary files."""
    return sorted(p for d in dirs if d.exists() for p in d.glob(f"*/{TMP_PREFIX}*{TMP_SUFFIX}"))


async def until_writing(*dirs: Path, count: int = 1) -> list[Path]:
    """Wait until ``count`` bundles are being written in ``dirs`` (their temporary files
    exist); the caller's real-time deadline bounds the wait."""
    while len(found := partial_files(*dirs)) < count:  # noqa: ASYNC110 (another process)
        await trio.sleep(0.01)
    return found


class HeldArchiver:
    """Wraps an archiver: every job it writes also reads ``held``, so it stays mid-write
    until ``held.release()``."""

    def __init__(self, inner: Any, held: HeldSource) -> None:
        self._inner = inner
        self._held = held

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def write(self, job: ArchiveJob) -> Any:
        return await self._inner.write(self._held.add_to(job))
