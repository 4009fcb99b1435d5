"""``zone-bundle create`` and ``bundle-all``: bundle live zones through the agent's jobs,
with progress on stderr (when it is a terminal), and download what they made.

``bundle-all`` is omicron's removed verb: every live zone is bundled (zones that appear
meanwhile too), each bundle downloaded and added to one tarball as
``<zone>/<bundle id>.tar.gz``, gzip level 1 (the bundles inside are compressed already).
Jobs are started together (the agent bounds how many run at once); bundles are
downloaded one at a time, each streamed to a temporary file and then appended, so memory
holds a chunk, never a bundle. The tarball is written under a temporary name and renamed
when complete. A zone that is gone or whose bundle fails is reported and skipped.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import tarfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
import trio
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TransferSpeedColumn,
)

from ._failures import CommandFailed
from ._wire import BundleJobStatus
from ._zb_client import AgentClient, partial_file

_POLL_S = 0.2
_FINISHED = ("done", "failed")


def default_output() -> Path:
    """omicron's name: ``<hostname>-<local time>.tar.gz`` in the working directory."""
    stamp = dt.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    return Path(f"{socket.gethostname()}-{stamp}.tar.gz")


@contextmanager
def download_progress(console: Console, what: str) -> Iterator[Callable[[int, int | None], None]]:
    """A byte counter with speed while a download runs (nothing if not a terminal)."""
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    ) as progress:
        task = progress.add_task(what, total=None)

        def update(done: int, total: int | None) -> None:
            progress.update(task, completed=done, total=total)

        yield update


async def _wait_job(
    agent: AgentClient, job: dict[str, Any], on_state: Callable[[str], None]
) -> dict[str, Any]:
    on_state(job["state"])
    while job["state"] not in _FINISHED:
        await trio.sleep(_POLL_S)
        job = await agent.answer("GET", f"/zones/bundle-jobs/{job['job_id']}", BundleJobStatus)
        on_state(job["state"])
    return job


async def bundle_zone(agent: AgentClient, zone_name: str, console: Console) -> dict[str, Any]:
    """Bundle one live zone as a job, with a spinner; the new bundle's metadata."""
    job = await agent.answer("POST", f"/zones/bundles/{zone_name}", BundleJobStatus)
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    ) as progress:
        task = progress.add_task(zone_name)
        job = await _wait_job(
            agent, job, lambda state: progress.update(task, description=f"{zone_name}: {state}")
        )
    if job["state"] == "failed":
        raise CommandFailed(f"{zone_name}: bundle failed: {job['error']}")
    bundle: dict[str, Any] = job["bundle"]
    return bundle


@attrs.define
class BundleAllReport:
    added: list[str] = attrs.field(factory=list)  # "<zone>/<bundle id>.tar.gz"
    failed: dict[str, str] = attrs.field(factory=dict)  # zone -> why its bundle failed
    #: Listed but not live (gone, or held by the reaper, which bundles it itself).
    skipped: dict[str, str] = attrs.field(factory=dict)


def _add(tar: tarfile.TarFile, zone: str, bundle_file: Path, name: str) -> None:
    """Append ``zone/`` (once) and the bundle under ``name`` (blocking)."""
    now = time.time()
    directory = tarfile.TarInfo(zone)  # each zone is bundled once
    directory.type, directory.mode, directory.mtime = tarfile.DIRTYPE, 0o755, now
    tar.addfile(directory)
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = bundle_file.stat().st_size, 0o444, now
    with bundle_file.open("rb") as f:
        tar.addfile(info, f)


async def bundle_all_zones(
    agent: AgentClient, output: Path, console: Console, *, verbose: bool
) -> BundleAllReport:
    """Bundle every live zone into ``output``; what was added and what failed."""
    part = output.with_name(f".{output.name}.part-{os.getpid()}")
    scratch = output.with_name(f".{output.name}.bundle-{os.getpid()}")
    with partial_file(part, scratch):
        return await _bundle_all_into(agent, part, scratch, output, console, verbose=verbose)


async def _bundle_all_into(
    agent: AgentClient, part: Path, scratch: Path, output: Path, console: Console, *, verbose: bool
) -> BundleAllReport:
    report = BundleAllReport()
    limiter = trio.CapacityLimiter(1)  # the tarball is written by one thread at a time
    seen: set[str] = set()
    try:
        tar = await trio.to_thread.run_sync(
            # closed in the finally below, in a thread as well
            lambda: tarfile.open(part, "w:gz", compresslevel=1),  # noqa: SIM115
            limiter=limiter,
        )
        try:
            with Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                console=console,
                transient=True,
                disable=not console.is_terminal,
            ) as progress:
                while True:  # until a listing shows no zone not yet seen (omicron's loop)
                    zones = [
                        z for z in await agent.answer("GET", "/zones", list[str]) if z not in seen
                    ]
                    if not zones:
                        break
                    seen.update(zones)
                    jobs = await _start_jobs(agent, zones, report)
                    for zone, job in jobs.items():
                        task = progress.add_task(zone)

                        def show(state: str, task: Any = task, zone: str = zone) -> None:
                            progress.update(task, description=f"{zone}: {state}")

                        job = await _wait_job(agent, job, show)
                        if job["state"] == "failed":
                            report.failed[zone] = f"bundle failed: {job['error']}"
                            progress.remove_task(task)
                            continue
                        bundle_id = job["bundle"]["id"]["bundle_id"]
                        show("downloading")
                        await agent.download(
                            f"/zones/bundles/{zone}/{bundle_id}", scratch, lambda d, t: None
                        )
                        name = f"{zone}/{bundle_id}.tar.gz"
                        await trio.to_thread.run_sync(
                            _add, tar, zone, scratch, name, limiter=limiter
                        )
                        report.added.append(name)
                        progress.remove_task(task)
                        if verbose:
                            print(f"Added bundle: {name}", flush=True)
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(tar.close, limiter=limiter)
        await trio.Path(part).replace(output)
    finally:
        with trio.CancelScope(shield=True):
            await trio.Path(part).unlink(missing_ok=True)
            await trio.Path(scratch).unlink(missing_ok=True)
    return report


async def _start_jobs(
    agent: AgentClient, zones: list[str], report: BundleAllReport
) -> dict[str, dict[str, Any]]:
    """A bundle job per zone; a zone that is not live (gone, or being reaped) is noted."""
    jobs = {}
    for zone in zones:
        try:
            jobs[zone] = await agent.answer("POST", f"/zones/bundles/{zone}", BundleJobStatus)
        except CommandFailed as exc:
            if "NO_SUCH_ZONE" not in str(exc):
                raise
            report.skipped[zone] = "not a live zone (gone, or being torn down)"
    return jobs
