"""Bundles written in worker processes (``ProcessArchiver``): the same files as the
thread archiver, workers kept between bundles, and nothing left behind when a bundle is
cancelled, fails, or its worker dies."""

from __future__ import annotations

import os
import signal
import sys
import tarfile
import uuid
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing

from sledagent import ProcessArchiver, TarArchiver
from sledagent._archive_procs import ArchiveWorkerDied
from sledagent._archive_worker import BlobMirror, _decode
from sledagent._host import ArchiveJob, CommandOutput

from ._hold import held_source, until_writing
from .test_archive import leftovers, make_job


def members(path: str) -> dict[str, bytes]:
    with tarfile.open(path, "r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]


async def test_a_worker_process_writes_the_same_bundle_as_a_thread(tmp_path: Path) -> None:
    job = make_job(tmp_path, big=3 << 20)
    archiver = ProcessArchiver([tmp_path / "p0", tmp_path / "p1"], max_file_bytes=1 << 20)
    try:
        info = await archiver.write(job)
    finally:
        await archiver.aclose()
    expected = await TarArchiver([tmp_path / "t0"], max_file_bytes=1 << 20).write(job)
    assert info.metadata == expected.metadata
    assert [Path(p).parent.parent for p in info.paths] == [tmp_path / "p0", tmp_path / "p1"]
    got, want = members(info.paths[0]), members(expected.paths[0])
    assert got == want  # entry for entry, the capped log and the manifest included
    assert members(info.paths[1]) == got
    assert not [p for p in leftovers(tmp_path / "p0") if ".tmp" in p]


async def test_workers_are_kept_between_bundles_up_to_their_bound(tmp_path: Path) -> None:
    archiver = ProcessArchiver([tmp_path / "d"], workers=2)
    jobs = []
    for i in range(6):
        (tmp_path / str(i)).mkdir()
        jobs.append(make_job(tmp_path / str(i)))
    try:
        async with trio.open_nursery() as nursery:
            for job in jobs:
                nursery.start_soon(archiver.write, job)
        for job in jobs[:2]:  # and again, one at a time
            await archiver.write(job)
    finally:
        await archiver.aclose()
    assert archiver.started == 2
    assert len([p for p in leftovers(tmp_path / "d") if p.endswith(".tar.gz")]) == 6


async def test_a_cancelled_bundle_leaves_no_file_and_the_next_one_is_written(
    tmp_path: Path,
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    dirs = [tmp_path / "d0", tmp_path / "d1"]
    archiver = ProcessArchiver(dirs, compression_level=3)
    with held_source(tmp_path / "fifo") as held:
        job = held.add_to(make_job(tmp_path / "a"))  # stays mid-write until released
        try:
            async with trio.open_nursery() as nursery:
                scope = trio.CancelScope()

                async def write_held() -> None:
                    with scope:
                        await archiver.write(job)

                nursery.start_soon(write_held)
                (partial,) = await until_writing(tmp_path / "d0")  # the worker is writing
                scope.cancel()
            assert scope.cancelled_caught
            # The worker is gone by the time write() returns, and so is every file.
            assert not partial.exists()
            assert leftovers(*dirs) == []
            info = await archiver.write(make_job(tmp_path / "b"))
        finally:
            await archiver.aclose()
    assert archiver.started == 2 and archiver._ended == 2  # killed, replaced, closed
    assert leftovers(*dirs) == sorted(info.paths)


async def test_an_error_in_the_worker_reaches_the_caller_and_leaves_no_file(
    tmp_path: Path,
) -> None:
    job = make_job(tmp_path)
    os.unlink(job.snapshot.files[1].path)  # a source vanishes while writing
    archiver = ProcessArchiver([tmp_path / "d0", tmp_path / "d1"])
    try:
        with pytest.raises(FileNotFoundError):
            await archiver.write(job)
    finally:
        await archiver.aclose()
    assert leftovers(tmp_path / "d0", tmp_path / "d1") == []
    assert archiver.started == 1  # an error in a bundle does not cost the worker


async def test_a_worker_that_dies_mid_bundle_fails_it_cleanly_and_is_replaced(
    tmp_path: Path,
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    archiver = ProcessArchiver([tmp_path / "d0"], compression_level=3)
    with held_source(tmp_path / "fifo") as held:
        try:
            first = await archiver.write(make_job(tmp_path / "b"))  # a worker, idle now
            (worker,) = archiver._idle
            job = held.add_to(make_job(tmp_path / "a"))  # stays mid-write until released
            failures: list[Exception] = []

            async def write_held() -> None:
                try:
                    await archiver.write(job)
                except ArchiveWorkerDied as exc:
                    failures.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(write_held)
                (partial,) = await until_writing(tmp_path / "d0")  # the worker is writing
                os.kill(worker.process.pid, signal.SIGKILL)
            assert len(failures) == 1
            assert f"archive worker {worker.process.pid} exited" in str(failures[0])
            assert not partial.exists()
            assert leftovers(tmp_path / "d0") == list(first.paths)
            held.release()
            again = await archiver.write(job)  # on a new worker
        finally:
            await archiver.aclose()
    assert archiver.started == 2
    assert leftovers(tmp_path / "d0") == sorted([*first.paths, *again.paths])


async def test_warm_up_starts_every_worker_before_the_first_bundle(tmp_path: Path) -> None:
    archiver = ProcessArchiver([tmp_path / "d"], workers=2)
    try:
        await archiver.warm_up()
        assert archiver.started == 2
        await archiver.write(make_job(tmp_path))
    finally:
        await archiver.aclose()
    assert archiver.started == 2  # the bundle took a warm worker


async def test_a_worker_that_cannot_start_fails_each_bundle_but_not_the_agent(
    tmp_path: Path,
) -> None:
    archiver = ProcessArchiver([tmp_path / "d"], workers=1)
    archiver._argv = [sys.executable, "-c", "import sys; sys.exit(3)"]  # dies before greeting
    try:
        await archiver.warm_up()  # logged, not raised: the daemon starts all the same
        with pytest.raises(ArchiveWorkerDied):
            await archiver.write(make_job(tmp_path))
    finally:
        await archiver.aclose()
    assert leftovers(tmp_path / "d") == []
    assert archiver.started == 2 and archiver._ended == 2  # nothing left running


async def test_a_bundle_arriving_while_workers_start_waits_for_them_not_for_a_new_one(
    tmp_path: Path,
) -> None:
    archiver = ProcessArchiver([tmp_path / "d"], workers=1)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(archiver.warm_up)
            await trio.testing.wait_all_tasks_blocked()  # the worker is starting
            info = await archiver.write(make_job(tmp_path))
        assert leftovers(tmp_path / "d") == list(info.paths)
    finally:
        await archiver.aclose()
    assert archiver.started == 1  # one interpreter start, shared


def _with_output(job: ArchiveJob, name: str, output: bytes, bundle: uuid.UUID) -> ArchiveJob:
    meta = attrs.evolve(job.metadata, id=attrs.evolve(job.metadata.id, bundle_id=bundle))
    snapshot = attrs.evolve(job.snapshot, bundle_id=bundle)
    command = CommandOutput(name, ("ss", "-an"), output, 0, 0.1)
    return ArchiveJob(meta, (*job.commands[:1], command), snapshot)


def test_a_large_output_shared_by_bundles_is_sent_to_a_worker_once(tmp_path: Path) -> None:
    """``ss -an`` at 1000 zones is ~650 KB, the same in every zone bundled within a second:
    it crosses the pipe once per worker, not once per bundle (performance.md, Session 10)."""
    base = make_job(tmp_path)
    shared = b"tcp LISTEN 0 128 127.0.0.1:12400 0.0.0.0:*\n" * 8000  # ~350 KB
    mirror, held = BlobMirror(), {}
    jobs = [_with_output(base, "ss", shared, uuid.uuid4()) for _ in range(3)]
    changed = shared.replace(b"LISTEN", b"ESTAB ", 1)  # a later run: other bytes
    jobs.append(_with_output(base, "ss", changed, uuid.uuid4()))
    sizes = []
    for job in jobs:
        payload = mirror.encode(job)
        sizes.append(len(payload))
        decoded, held = _decode(payload, held)
        assert decoded == job  # what the worker archives is the job, byte for byte
    assert sizes[0] > len(shared) and sizes[3] > len(shared)  # sent when new
    assert max(sizes[1:3]) < 4096  # named, not sent
    assert list(held.values()) == [changed]  # the worker keeps only what the last job used


async def test_bundles_sharing_an_output_each_carry_it_whole(tmp_path: Path) -> None:
    base = make_job(tmp_path)
    shared = b"u_str ESTAB 0 0 * 4242 * 4243\n" * 10000
    other = b"u_str LISTEN 0 0 * 77 * 0\n" * 10000
    jobs = [_with_output(base, "ss", out, uuid.uuid4()) for out in (shared, shared, other, shared)]
    archiver = ProcessArchiver([tmp_path / "d0"], workers=1)
    try:
        infos = [await archiver.write(job) for job in jobs]
    finally:
        await archiver.aclose()
    assert archiver.started == 1  # one worker: it had the blob for the second bundle
    for info, out in zip(infos, (shared, shared, other, shared), strict=True):
        assert members(info.paths[0])["ss"] == b'Command: ["ss", "-an"]\n' + out
