"""The tar.gz archive: omicron-compatible contents, all-or-nothing writes, every copy."""

from __future__ import annotations

import datetime as dt
import json
import os
import stat
import tarfile
import tomllib
import uuid
from pathlib import Path

import attrs
import pytest
import trio

from sledagent import (
    ArchiveJob,
    CommandOutput,
    LogSource,
    Snapshot,
    TarArchiver,
    ZoneBundleCause,
    ZoneBundleId,
    ZoneBundleMetadata,
)

from ._hold import held_source, until_writing

ZONE = "oxz_propolis-server_0c0c0c0c-0000-4000-8000-000000000001"


def make_job(tmp_path: Path, *, big: int = 0) -> ArchiveJob:
    snap = tmp_path / "snap"
    snap.mkdir()
    files = []
    for name, data in [
        ("oxide-propolis-server:default.log", b'{"msg":"live"}\n' * 10),
        ("oxide-propolis-server:default.log.0", b'{"msg":"rotated"}\n' * 10),
        ("oxide-propolis-server:default.log.1700000000", b"A" * big + b"NEWEST"),
    ]:
        (snap / name).write_bytes(data)
        files.append(LogSource(name, str(snap / name), len(data)))
    bundle_id = uuid.uuid4()
    meta = ZoneBundleMetadata(
        cause=ZoneBundleCause.TERMINATED_INSTANCE,
        id=ZoneBundleId(bundle_id=bundle_id, zone_name=ZONE),
        time_created=dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC),
        version=0,
    )
    commands = (
        CommandOutput("ps", ("ps", "-o", "pid"), b"PID\n1\n", 0, 0.01),
        CommandOutput("ss", ("ss", "-an"), b"", None, 5.0, timed_out=True),
        CommandOutput("last", ("last",), b"", None, 0.0, error="last: not found on this host"),
    )
    return ArchiveJob(meta, commands, Snapshot(str(snap), ZONE, bundle_id, tuple(files)))


def leftovers(*dirs: Path) -> list[str]:
    return sorted(str(p) for d in dirs if d.exists() for p in d.rglob("*") if p.is_file())


async def test_bundle_contents_match_omicrons_layout_entry_by_entry(tmp_path: Path) -> None:
    job = make_job(tmp_path)
    archiver = TarArchiver([tmp_path / "debug"])
    info = await archiver.write(job)
    (path,) = info.paths
    assert path == str(tmp_path / "debug" / ZONE / f"{job.metadata.id.bundle_id}.tar.gz")
    with tarfile.open(path, "r:gz") as tar:
        names = tar.getnames()
        read = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    assert names[0] == "metadata.toml"
    meta = tomllib.loads(read["metadata.toml"].decode())
    assert meta == {
        "time_created": "2026-11-23T12:00:00Z",
        "version": 0,
        "cause": "terminated_instance",
        "id": {"zone_name": ZONE, "bundle_id": str(job.metadata.id.bundle_id)},
    }
    assert names[1:4] == ["ps", "ss", "last"]
    assert read["ps"].startswith(b'Command: ["ps", "-o", "pid"]\nPID\n1\n')
    assert b"[timed out]" in read["ss"] and b"not found" in read["last"]
    for f in job.snapshot.files:
        assert read[f.name] == Path(f.path).read_bytes()
    manifest = json.loads(read["manifest.json"])
    assert {c["name"]: c["timed_out"] for c in manifest["commands"]} == {
        "ps": False,
        "ss": True,
        "last": False,
    }
    assert manifest["truncated"] == []
    assert info.size == os.path.getsize(path)


async def test_a_file_over_the_cap_keeps_its_newest_bytes(tmp_path: Path) -> None:
    job = make_job(tmp_path, big=10_000)
    info = await TarArchiver([tmp_path / "debug"], max_file_bytes=1000).write(job)
    with tarfile.open(info.paths[0], "r:gz") as tar:
        data = tar.extractfile("oxide-propolis-server:default.log.1700000000").read()  # type: ignore[union-attr]
        manifest = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
    assert len(data) == 1000 and data.endswith(b"NEWEST")
    assert manifest["truncated"] == [
        {
            "name": "oxide-propolis-server:default.log.1700000000",
            "original_size": 10_006,
            "kept": 1000,
        }
    ]


async def test_a_source_archives_only_its_recorded_bytes_even_if_the_file_changed(
    tmp_path: Path,
) -> None:
    job = make_job(tmp_path)
    grown, cut = job.snapshot.files[0], job.snapshot.files[1]
    with open(grown.path, "ab") as f:  # a linked live log written after its snapshot
        f.write(b"LATER\n" * 100)
    recorded = Path(cut.path).read_bytes()
    Path(cut.path).write_bytes(recorded[:5])  # one truncated below its recorded start
    files = (
        attrs.evolve(grown, start=3),
        attrs.evolve(cut, start=50),
        *job.snapshot.files[2:],
    )
    job = attrs.evolve(job, snapshot=attrs.evolve(job.snapshot, files=files))
    info = await TarArchiver([tmp_path / "debug"]).write(job)
    with tarfile.open(info.paths[0], "r:gz") as tar:
        live = tar.extractfile(grown.name).read()  # type: ignore[union-attr]
        truncated = tar.extractfile(cut.name).read()  # type: ignore[union-attr]
    assert live == (b'{"msg":"live"}\n' * 10)[3:]  # bytes [start, size): nothing written later
    assert truncated == b""  # what is left of it lies before its start


@pytest.mark.parametrize("level", [0, 2, 9])
async def test_every_compression_level_writes_a_bundle_that_opens(
    tmp_path: Path, level: int
) -> None:
    # 0..3: isal (ours); 9: stdlib zlib, omicron's "best" (the inline baseline's bundles)
    info = await TarArchiver([tmp_path / "debug"], compression_level=level).write(
        make_job(tmp_path, big=50_000)
    )
    with tarfile.open(info.paths[0], "r:gz") as tar:
        assert tar.getnames()[0] == "metadata.toml"
    with pytest.raises(ValueError, match="compression_level"):
        TarArchiver([tmp_path / "debug"], compression_level=10)


async def test_every_debug_directory_gets_a_copy_readable_only_by_owner_and_group(
    tmp_path: Path,
) -> None:
    dirs = [tmp_path / "m2a", tmp_path / "m2b"]
    info = await TarArchiver(dirs).write(make_job(tmp_path))
    assert len(info.paths) == 2
    contents = {Path(p).read_bytes() for p in info.paths}
    assert len(contents) == 1
    for p in info.paths:
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o640
    assert not [p for p in leftovers(*dirs) if p.endswith(".tmp")]


async def test_a_failure_mid_archive_leaves_no_file(tmp_path: Path) -> None:
    job = make_job(tmp_path)
    os.unlink(job.snapshot.files[1].path)  # a source vanishes while writing
    dirs = [tmp_path / "d0", tmp_path / "d1"]
    with pytest.raises(FileNotFoundError):
        await TarArchiver(dirs).write(job)
    assert leftovers(*dirs) == []


async def test_a_failing_copy_to_the_second_directory_removes_the_first_too(tmp_path: Path) -> None:
    (tmp_path / "d1").write_text("not a directory")
    with pytest.raises(OSError):
        await TarArchiver([tmp_path / "d0", tmp_path / "d1"]).write(make_job(tmp_path))
    assert leftovers(tmp_path / "d0") == []


async def test_a_failing_rename_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_rename(src: object, dst: object) -> None:
        raise OSError("rename failed (injected)")

    monkeypatch.setattr("sledagent._archive.os.rename", broken_rename)
    with pytest.raises(OSError, match="injected"):
        await TarArchiver([tmp_path / "d0"]).write(make_job(tmp_path))
    assert leftovers(tmp_path / "d0") == []


async def test_a_cancelled_archive_leaves_no_file(tmp_path: Path) -> None:
    archiver = TarArchiver([tmp_path / "d0"], compression_level=3)
    with held_source(tmp_path / "fifo") as held:
        job = held.add_to(make_job(tmp_path))  # stays mid-write until released
        async with trio.open_nursery() as nursery:
            scope = trio.CancelScope()

            async def write_held() -> None:
                with scope:
                    await archiver.write(job)

            nursery.start_soon(write_held)
            (partial,) = await until_writing(tmp_path / "d0")  # the thread is writing
            scope.cancel()
        assert scope.cancelled_caught  # write() returned at once, the thread still held
        # Never under its final name. (The temporary file is there until the thread runs
        # again: at once if it had not reached the held source yet, else once released.)
        assert set(leftovers(tmp_path / "d0")) <= {str(partial)}
        held.release()
        # The abandoned thread removes its temporary file as soon as it runs again.
        while leftovers(tmp_path / "d0"):  # noqa: ASYNC110 (a thread, not a trio task)
            await trio.sleep(0.01)


async def test_the_startup_sweep_removes_partial_files_only(tmp_path: Path) -> None:
    archiver = TarArchiver([tmp_path / "d0"])
    info = await archiver.write(make_job(tmp_path))
    partial = tmp_path / "d0" / ZONE / f".{uuid.uuid4()}.tar.gz.tmp"
    partial.write_bytes(b"half a bundle")
    assert await archiver.sweep_partial() == 1
    assert leftovers(tmp_path / "d0") == [info.paths[0]]
