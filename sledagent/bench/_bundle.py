"""``sledagent bench bundle``: how fast are real bundles, against pigz and omicron's way?

Z local zones are created with M MB each of realistic JSON logs (log-normal file sizes:
live, rotated and archived files). They are bundled at once through the real
``ZoneBundler`` (phase 1 commands + snapshot, phase 2 tar.gz through isal in worker
threads or processes, one slot per core by default). In the same run, on the same files:

- ``pigz``: ``tar -cf - <files> | pigz -p <cores> -1`` per zone, all zones in sequence
  (pigz's fastest level, every core), when pigz is installed;
- ``gzip9``: Python's ``tarfile`` with gzip level 9, one zone after the other (what
  omicron does: ``flate2`` at its best compression, serialized by one mutex).

Reported: MB/s of log data (input bytes / wall time), compression ratio (output / input),
zone-held seconds (phase 1) p50/p99, and the ratios ours / pigz and ours / gzip9.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
import time
import uuid
from pathlib import Path
from typing import Literal

import attrs
import trio

from .._archive import TarArchiver
from .._archive_procs import ProcessArchiver
from .._bundler import ZoneBundler
from .._failures import UsageError
from .._host import Zone, ZoneSpec
from .._local_zones import LOG_SUBDIR, LocalZoneBackend, LocalZonesConfig
from .._stats import summary
from .._store import MemoryBundleStore
from .._wire import ZoneBundleCause


@attrs.frozen(kw_only=True)
class BundleBenchParams:
    zones: int = 8
    log_mb: float = 10.0
    level: int = 2
    archive_concurrency: int = attrs.field(factory=lambda: os.cpu_count() or 1)
    baselines: bool = True
    #: Where the archives are compressed, as the daemon's ``archive_in``.
    archive_in: Literal["process", "thread"] = "process"

    def __attrs_post_init__(self) -> None:
        if self.zones < 1 or self.log_mb <= 0 or self.archive_concurrency < 1:
            raise UsageError("--zones and --archive-concurrency must be >= 1, --log-mb > 0")
        if not 0 <= self.level <= 3:
            raise UsageError("--level must be 0..3 (isal)")


def _zone_files(root: Path, zone: Zone) -> list[Path]:
    log_dir = root / "zones" / zone.name / LOG_SUBDIR
    return sorted(log_dir.iterdir()) + sorted((root / "archive" / zone.name).iterdir())


def _pigz(files_per_zone: list[list[Path]], out_dir: Path, cores: int) -> int:
    total = 0
    for i, files in enumerate(files_per_zone):
        out = out_dir / f"pigz-{i}.tar.gz"
        with open(out, "wb") as f:
            tar = subprocess.Popen(
                ["tar", "-cf", "-", *[str(p) for p in files]],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
            subprocess.run(["pigz", "-p", str(cores), "-1"], stdin=tar.stdout, stdout=f, check=True)
            assert tar.stdout is not None
            tar.stdout.close()
            tar.wait()
        total += out.stat().st_size
    return total


def _gzip9(files_per_zone: list[list[Path]], out_dir: Path) -> int:
    total = 0
    for i, files in enumerate(files_per_zone):
        out = out_dir / f"gzip9-{i}.tar.gz"
        with tarfile.open(out, "w:gz", compresslevel=9) as tar:
            for p in files:
                tar.add(p, arcname=p.name)
        total += out.stat().st_size
    return total


async def run_bundle_bench(
    params: BundleBenchParams, workdir: Path | None = None
) -> dict[str, object]:
    tmp = Path(workdir or tempfile.mkdtemp(prefix="sledagent-bench-"))
    try:
        return await _run(params, tmp)
    finally:
        if workdir is None:
            await trio.to_thread.run_sync(shutil.rmtree, tmp, True)


async def _run(params: BundleBenchParams, tmp: Path) -> dict[str, object]:
    seed_bytes = int(params.log_mb * (1 << 20))
    backend = LocalZoneBackend(
        LocalZonesConfig(root=tmp, log_rate_bps=0, seed_log_bytes=seed_bytes)
    )
    zones = [
        await backend.install(ZoneSpec(uuid.uuid4(), uuid.uuid4(), "127.0.0.1:0"))
        for _ in range(params.zones)
    ]
    files = [await trio.to_thread.run_sync(_zone_files, tmp, z) for z in zones]
    input_bytes = await trio.to_thread.run_sync(
        lambda: sum(p.stat().st_size for fs in files for p in fs)
    )
    archiver: TarArchiver | ProcessArchiver
    level, cap = params.level, 1 << 40
    if params.archive_in == "thread":
        archiver = TarArchiver([tmp / "debug"], compression_level=level, max_file_bytes=cap)
    else:
        archiver = ProcessArchiver(
            [tmp / "debug"],
            compression_level=level,
            max_file_bytes=cap,
            workers=params.archive_concurrency,
        )
    bundler = ZoneBundler(
        backend,
        archiver,
        MemoryBundleStore(),
        collect_concurrency=8,
        archive_concurrency=params.archive_concurrency,
        command_timeout_s=30.0,
        snapshot_cleanup_timeout_s=60.0,
    )
    if isinstance(archiver, ProcessArchiver):
        # As the daemon does at start: the timing is of bundling, not of starting workers.
        await archiver.warm_up()
    t0 = time.perf_counter()
    sizes: list[int] = []
    async with trio.open_nursery() as nursery:
        for zone in zones:

            async def one(zone: Zone = zone) -> None:
                sizes.append((await bundler.create(zone, ZoneBundleCause.OTHER)).size)

            nursery.start_soon(one)
    ours_s = time.perf_counter() - t0
    if isinstance(archiver, ProcessArchiver):
        await archiver.aclose()
    mb = input_bytes / (1 << 20)
    report: dict[str, object] = {
        "input_mb": round(mb, 2),
        "ours": {
            "mb_per_s": round(mb / ours_s, 1),
            "seconds": round(ours_s, 3),
            "ratio": round(sum(sizes) / input_bytes, 4),
            "zone_held_s": {
                k: v for k, v in summary(bundler.statistics().zone_held_s).items() if k != "max"
            },
            "level": params.level,
            "archive_slots": params.archive_concurrency,
            "archive_in": params.archive_in,
        },
    }
    if params.baselines:
        cores = os.cpu_count() or 1
        out = tmp / "baselines"
        out.mkdir()
        if shutil.which("pigz"):
            t0 = time.perf_counter()
            pigz_bytes = await trio.to_thread.run_sync(_pigz, files, out, cores)
            pigz_s = time.perf_counter() - t0
            report["pigz_1"] = {
                "mb_per_s": round(mb / pigz_s, 1),
                "seconds": round(pigz_s, 3),
                "ratio": round(pigz_bytes / input_bytes, 4),
            }
        else:
            report["pigz_1"] = None
        t0 = time.perf_counter()
        gzip_bytes = await trio.to_thread.run_sync(_gzip9, files, out)
        gzip_s = time.perf_counter() - t0
        report["gzip9_serial"] = {
            "mb_per_s": round(mb / gzip_s, 1),
            "seconds": round(gzip_s, 3),
            "ratio": round(gzip_bytes / input_bytes, 4),
        }
        ours = report["ours"]["mb_per_s"]  # type: ignore[index]
        report["ratios"] = {
            "vs_pigz_1": (
                round(ours / report["pigz_1"]["mb_per_s"], 2)  # type: ignore[index]
                if report["pigz_1"]
                else None
            ),
            "vs_gzip9_serial": round(ours / report["gzip9_serial"]["mb_per_s"], 2),  # type: ignore[index]
        }
    for zone in zones:
        await backend.halt_and_remove(zone)
    return report
