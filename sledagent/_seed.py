"""Seeded log volume for local zones: what a long-running VMM's log directory holds.

A new zone gets ``seed_log_bytes`` of Propolis-like JSON logs (live, rotated and archived
files with log-normal sizes) so that bundles, benchmarks and demos work on realistic
volume. Benchmarks with many zones generate one set into a cache and hard-link the
immutable files into each zone (``seed_from_cache``).
"""

from __future__ import annotations

import os
import random
import shutil
import threading
import time
from pathlib import Path

from ._logwriter import SERVICE_LOG, log_lines


def seed_logs(
    log_dir: Path, archive_dir: Path, total_bytes: int, *, keep: int = 4, seed: int | None = None
) -> None:
    """Create about ``total_bytes`` of logs: live, rotated and archived files whose sizes
    follow a log-normal distribution (a long-running VMM's log directory)."""
    rng = random.Random(seed)
    archive_dir.mkdir(parents=True, exist_ok=True)
    sizes: list[int] = []
    cap = max(4096, total_bytes // 4)  # at least four files: live, rotated and archived
    while sum(sizes) < total_bytes:
        sizes.append(min(cap, max(4096, int(rng.lognormvariate(13.0, 1.0)))))  # median ~440 KiB
    sizes[-1] = max(1024, total_bytes - sum(sizes[:-1]))
    n = len(sizes)
    rotated = min(keep, (n - 1) // 2)  # the newest files before the live one
    now = int(time.time())
    for i, size in enumerate(sizes):
        age_s = (n - i) * 3600
        data = log_lines(size, rng, start=now - age_s)
        if i == n - 1:
            path = log_dir / SERVICE_LOG
        elif i >= n - 1 - rotated:
            path = log_dir / f"{SERVICE_LOG}.{n - 2 - i}"  # .0 is the newest
        else:
            path = archive_dir / f"{SERVICE_LOG}.{now - age_s}"
        path.write_bytes(data)


_SEED_CACHE_LOCK = threading.Lock()  # zones may be installed from several threads


def seed_from_cache(cache: Path, log_dir: Path, archive_dir: Path, total_bytes: int) -> None:
    template = cache / str(total_bytes)
    with _SEED_CACHE_LOCK:
        if not (template / ".complete").exists():
            shutil.rmtree(template, ignore_errors=True)
            (template / "log").mkdir(parents=True)
            seed_logs(template / "log", template / "archive", total_bytes, seed=1)
            (template / ".complete").touch()
    archive_dir.mkdir(parents=True, exist_ok=True)
    for src in (template / "log").iterdir():
        if src.name == SERVICE_LOG:
            shutil.copyfile(src, log_dir / src.name)  # the live file is appended to
        else:
            link_or_copy(src, log_dir / src.name)
    for src in (template / "archive").iterdir():
        link_or_copy(src, archive_dir / src.name)


def link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(src, dst)
