"""What a scan of the bundle store cannot leave hidden (issue 15, part 5, QA round 2):
stale temporary bundle files, files added since the last scan, trailing data after a
bundle, and directories that cannot be listed.

Real files and real threads: every test that awaits carries a ``fail_after``.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
import structlog
import trio

from sledagent._archive import TarArchiver
from sledagent._archive_procs import ProcessArchiver
from sledagent._bundle_check import NotABundle, check_bundle
from sledagent._errors import NotFound
from sledagent._host import ArchiveJob, LogSource
from sledagent._wire import CleanupContextUpdate

from .test_archive import make_job
from .test_bundle_quarantine import ZONE, bundle, unreadable
from .test_bundle_store import store_at

STALE_BYTES = 4 << 30  # the QA case: `truncate -s 4G .<uuid>.tar.gz.tmp` (sparse here too)


def stale_temp(debug_dir: Path, size: int = STALE_BYTES) -> Path:
    path = debug_dir / ZONE / f".{uuid.uuid4()}.tar.gz.tmp"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
    return path


# --- 4. stale temporary files ---------------------------------------------------------


async def test_a_stale_4_gib_temp_file_is_removed_and_no_bundle_is_deleted_for_it(
    tmp_path: Path,
) -> None:
    dirs = [tmp_path / "debug"]
    with trio.fail_after(60):
        kept = [await bundle(tmp_path, dirs, age_h=h) for h in range(6)]
        sizes = sum(b.size for b in kept)
        store = store_at(tmp_path, dirs, quota=sizes * 100 + 100)  # 1% holds the bundles
        await store.open()
        await store.update_context(CleanupContextUpdate(storage_limit=1))
        stale = stale_temp(dirs[0])  # appears after start: the startup sweep cannot see it
        counts = await store.cleanup()
        assert counts[str(dirs[0])].bundles == 0
        assert not stale.exists()
        assert sorted(b.bundle_id for b in await store.list_all()) == sorted(
            b.bundle_id for b in kept
        )
        (util,) = (await store.utilization()).values()
        assert util.bytes_used == sizes  # what is on disk now, no more
        assert util.bytes_used <= util.bytes_available
        assert store.statistics().stale_temp_files_removed == 1


async def test_a_utilization_request_removes_a_stale_temp_file_and_reports_without_it(
    tmp_path: Path,
) -> None:
    dirs = [tmp_path / "debug"]
    with trio.fail_after(60):
        b = await bundle(tmp_path, dirs)
        store = store_at(tmp_path, dirs)
        await store.open()
        stale = stale_temp(dirs[0], 12345)
        (util,) = (await store.utilization()).values()
    assert util.bytes_used == b.size
    assert not stale.exists()


async def test_cleanup_never_deletes_a_bundle_for_bytes_it_cannot_free(tmp_path: Path) -> None:
    dirs = [tmp_path / "debug"]
    with trio.fail_after(60):
        kept = [await bundle(tmp_path, dirs, age_h=h) for h in range(3)]
        sizes = sum(b.size for b in kept)
        store = store_at(tmp_path, dirs, quota=(sizes + 10) * 100)
        await store.open()
        await store.update_context(CleanupContextUpdate(storage_limit=1))
        writing = stale_temp(dirs[0], 1 << 30)  # a bundle an archive is writing (1 GiB)
        store.in_progress.add([writing])
        try:
            counts = await store.cleanup()
            (util,) = (await store.utilization()).values()
        finally:
            store.in_progress.discard([writing])
    assert counts[str(dirs[0])].bundles == 0
    assert len(await store.list_all()) == 3
    assert writing.exists()  # never taken for stale while written
    assert util.bytes_used == sizes + (1 << 30)  # counted, as omicron counts it


@pytest.mark.parametrize("kind", ["thread", "process"])
async def test_a_bundle_an_archive_is_writing_survives_scans_and_is_then_indexed(
    tmp_path: Path, kind: str
) -> None:
    dirs = [tmp_path / "debug"]
    job = make_job(tmp_path)
    fifo = tmp_path / "snap" / "live.log"  # the archive blocks opening it: mid-write
    os.mkfifo(fifo)
    job = attrs.evolve(
        job,
        snapshot=attrs.evolve(
            job.snapshot, files=(*job.snapshot.files, LogSource("live.log", str(fifo), 0))
        ),
    )
    archiver = TarArchiver(dirs) if kind == "thread" else ProcessArchiver(dirs, workers=1)
    store = store_at(tmp_path, dirs)
    temp = dirs[0] / ZONE / f".{job.metadata.id.bundle_id}.tar.gz.tmp"
    with trio.fail_after(60):
        await store.open()
        async with trio.open_nursery() as nursery:
            done = trio.Event()

            async def write(job: ArchiveJob) -> None:
                info = await archiver.write(job)
                await store.add(info)
                done.set()

            nursery.start_soon(write, job)
            while not temp.exists():  # noqa: ASYNC110 (waits for the file, no event to take)
                await trio.sleep(0.01)
            await store.cleanup()
            await store.utilization()
            assert temp.exists()
            await trio.to_thread.run_sync(_open_and_close_for_writing, fifo)
            await done.wait()
        if isinstance(archiver, ProcessArchiver):
            await archiver.aclose()
        (util,) = (await store.utilization()).values()
    (info,) = await store.list_all()
    assert info.bundle_id == job.metadata.id.bundle_id
    assert util.bytes_used == info.size
    assert not temp.exists()


def _open_and_close_for_writing(fifo: Path) -> None:
    with open(fifo, "wb"):
        pass


# --- 5. a file added after the last scan ----------------------------------------------


async def test_delete_of_a_file_added_after_the_last_scan_removes_it(tmp_path: Path) -> None:
    dirs = [tmp_path / "debug"]
    with trio.fail_after(30):
        store = store_at(tmp_path, dirs)
        await store.open()
        bad = unreadable(dirs[0])  # `head -c 5000 /dev/urandom > <zone>/<uuid>.tar.gz`
        bundle_id = uuid.UUID(bad.name.removesuffix(".tar.gz"))
        assert await store.delete(ZONE, bundle_id) is True  # 204 over HTTP
        assert not bad.exists()
        assert await store.quarantine() == []
        (util,) = (await store.utilization()).values()
    assert util.bytes_used == 0


async def test_get_of_a_file_added_after_the_last_scan_names_its_quarantine_reason(
    tmp_path: Path,
) -> None:
    dirs = [tmp_path / "debug"]
    with trio.fail_after(30):
        store = store_at(tmp_path, dirs)
        await store.open()
        bad = unreadable(dirs[0])
        bundle_id = uuid.UUID(bad.name.removesuffix(".tar.gz"))
        with pytest.raises(NotFound) as caught:
            await store.get_verified(ZONE, bundle_id)
        (q,) = await store.quarantine()
    assert "in quarantine" in str(caught.value) and "unreadable bundle" in str(caught.value)
    assert q.original_path == str(bad) and q.bytes == 5000


async def test_a_whole_bundle_copied_in_after_the_last_scan_is_served_at_once(
    tmp_path: Path,
) -> None:
    elsewhere, dirs = [tmp_path / "elsewhere"], [tmp_path / "debug"]
    with trio.fail_after(30):
        store = store_at(tmp_path, dirs)
        await store.open()
        b = await bundle(tmp_path, elsewhere)
        (dirs[0] / ZONE).mkdir(parents=True)
        os.rename(b.paths[0], dirs[0] / ZONE / Path(b.paths[0]).name)
        info = await store.get_verified(ZONE, b.bundle_id)
    assert info is not None and info.size == b.size


async def test_a_request_naming_a_bundle_that_is_nowhere_is_still_a_plain_miss(
    tmp_path: Path,
) -> None:
    dirs = [tmp_path / "debug"]
    with trio.fail_after(30):
        store = store_at(tmp_path, dirs)
        await store.open()
        assert await store.get_verified(ZONE, uuid.uuid4()) is None
        assert await store.delete(".quarantine", uuid.uuid4()) is False


# --- 10a. trailing data -----------------------------------------------------------------


async def test_trailing_garbage_after_a_whole_bundle_is_named_as_such(tmp_path: Path) -> None:
    dirs = [tmp_path / "debug"]
    with trio.fail_after(30):
        b = await bundle(tmp_path, dirs)
    with open(b.paths[0], "ab") as f:
        f.write(b"garbage\n")  # `echo garbage >> bundle`
    with pytest.raises(NotABundle) as caught:
        check_bundle(Path(b.paths[0]), dirs[0])
    assert str(caught.value) == (
        "trailing data after the archive: 8 bytes after its last gzip member"
    )


async def test_a_cut_bundle_is_still_called_truncated(tmp_path: Path) -> None:
    dirs = [tmp_path / "debug"]
    with trio.fail_after(30):
        b = await bundle(tmp_path, dirs, big=1 << 20)
    data = Path(b.paths[0]).read_bytes()
    Path(b.paths[0]).write_bytes(data[: len(data) * 9 // 10])
    with pytest.raises(NotABundle) as caught:
        check_bundle(Path(b.paths[0]), dirs[0])
    assert str(caught.value).startswith("truncated")


# --- 10b. a directory that cannot be listed -------------------------------------------


@pytest.fixture
def unlistable(monkeypatch: pytest.MonkeyPatch) -> Iterator[set[str]]:
    """Directories ``os.scandir`` refuses (``chmod 000`` does not stop root)."""
    refused: set[str] = set()
    real = os.scandir
    lock = threading.Lock()

    def scandir(path: str) -> object:
        with lock:
            if str(path) in refused:
                raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr("sledagent._bundle_scan.os.scandir", scandir)
    yield refused


async def test_an_unreadable_directory_is_listed_exported_and_logged_once(
    tmp_path: Path, unlistable: set[str]
) -> None:
    dirs = [tmp_path / "debug"]
    locked = dirs[0] / "oxz_locked"
    locked.mkdir(parents=True)
    (locked / f"{uuid.uuid4()}.tar.gz").write_bytes(b"x" * 100)
    unlistable.add(str(locked))
    with trio.fail_after(30), structlog.testing.capture_logs() as logs:
        store = store_at(tmp_path, dirs)
        await store.open()
        for _ in range(3):
            await store.utilization()
        (entry,) = await store.quarantine()
        counts = await store.cleanup()
        stats = store.statistics()
        unlistable.clear()
        assert await store.quarantine() != []  # the file inside is now seen, and judged
        stats_after = store.statistics()
    assert entry.path == entry.original_path == str(locked)
    assert entry.bytes == 0
    assert entry.reason.startswith("unreadable directory, its files not counted (size unknown)")
    assert "Permission denied" in entry.reason
    assert counts[str(dirs[0])].bundles == 0 and locked.is_dir()
    assert stats.unreadable_dirs == {str(dirs[0]): 1}
    assert stats_after.unreadable_dirs == {str(dirs[0]): 0}
    events = [e["event"] for e in logs]
    assert events.count("debug_dir_unreadable") == 1
    assert events.count("debug_dir_readable_again") == 1
