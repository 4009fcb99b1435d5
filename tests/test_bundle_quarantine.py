"""Nothing in a debug directory is hidden: every file is counted, what is not a whole
bundle is quarantined (listed, exported, removed first by cleanup), truncation is found
at start and before serving (issue 15, part 5).

Real files and real threads: every test that awaits carries a ``fail_after``.
"""

from __future__ import annotations

import datetime as dt
import gzip
import io
import json
import os
import random
import tarfile
import uuid
from pathlib import Path
from typing import Any

import pytest
import trio

from sledagent import VmmState, ZoneBundleCause
from sledagent._archive import metadata_toml
from sledagent._bundle_check import NotABundle, check_bundle, stream_ends_whole
from sledagent._errors import NotFound
from sledagent._host import BundleInfo
from sledagent._wire import ZoneBundleId, ZoneBundleMetadata

from .conftest import Contract
from .test_api import open_api
from .test_bundle_store import store_at, write_bundle
from .test_zone_bundle_cli import cli

ZONE = "oxz_propolis-server_0c0c0c0c-0000-4000-8000-000000000001"


async def bundle(tmp_path: Path, dirs: list[Path], **kw: Any) -> BundleInfo:
    info = await write_bundle(tmp_path, dirs, kw.pop("cause", ZoneBundleCause.OTHER), **kw)
    assert isinstance(info, BundleInfo)
    return info


def unreadable(debug_dir: Path, zone: str = ZONE, size: int = 5000) -> Path:
    """A ``<uuid>.tar.gz`` of ``size`` random bytes in a zone's bundle directory."""
    path = debug_dir / zone / f"{uuid.uuid4()}.tar.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(random.Random(size).randbytes(size))
    return path


def ends_whole(path: str | Path) -> bool:
    with open(path, "rb") as f:
        return stream_ends_whole(f)


def truncate_to(path: str | Path, fraction: float) -> int:
    data = Path(path).read_bytes()
    kept = int(len(data) * fraction)
    Path(path).write_bytes(data[:kept])
    return kept


# --- the 5,000-byte unreadable file -------------------------------------------------------


async def test_an_unreadable_5000_byte_bundle_is_counted_listed_and_removed_first(
    tmp_path: Path,
) -> None:
    dirs = [tmp_path / "debug"]
    with trio.fail_after(30):
        kept = [await bundle(tmp_path, dirs, age_h=h) for h in (2, 1)]
        bad = unreadable(dirs[0])
        sizes = sum(b.size for b in kept)
        # Room for both bundles and 2,000 bytes more: only the unreadable file must go.
        store = store_at(tmp_path, dirs, quota=(sizes + 2000) * 4)
        await store.open()

        (util,) = (await store.utilization()).values()
        assert util.bytes_used == sizes + 5000
        assert sorted(b.bundle_id for b in await store.list_all()) == sorted(
            b.bundle_id for b in kept
        )
        (q,) = await store.quarantine()
        assert (q.original_path, q.bytes, q.debug_dir) == (str(bad), 5000, str(dirs[0]))
        assert q.path == str(dirs[0] / ".quarantine" / ZONE / bad.name)
        assert "unreadable bundle" in q.reason
        assert not bad.exists() and Path(q.path).stat().st_size == 5000
        stats = store.statistics()
        assert stats.quarantine_files == {str(dirs[0]): 1}
        assert stats.quarantine_bytes == {str(dirs[0]): 5000}
        assert stats.quarantined == 1

        counts = await store.cleanup()
        assert counts[str(dirs[0])].bundles == 0 and counts[str(dirs[0])].bytes == 5000
        assert not Path(q.path).exists()
        assert len(await store.list_all()) == 2 and all(Path(b.paths[0]).exists() for b in kept)
        assert await store.quarantine() == []
        (util,) = (await store.utilization()).values()
        assert util.bytes_used == sizes


async def test_cleanup_removes_quarantined_files_before_the_lowest_priority_bundle(
    tmp_path: Path,
) -> None:
    dirs = [tmp_path / "debug"]
    with trio.fail_after(30):
        old = await bundle(tmp_path, dirs, age_h=5)
        new = await bundle(tmp_path, dirs, cause=ZoneBundleCause.TERMINATED_INSTANCE)
        unreadable(dirs[0], size=5000)
        unreadable(dirs[0], size=7000)
        # Room for the newer bundle only: both quarantined files and then `old` go.
        store = store_at(tmp_path, dirs, quota=new.size * 4)
        await store.open()
        counts = await store.cleanup()
    assert counts[str(dirs[0])].bundles == 1
    assert counts[str(dirs[0])].bytes == 12_000 + old.size
    assert [b.bundle_id for b in await store.list_all()] == [new.bundle_id]
    assert not list((dirs[0] / ".quarantine").rglob("*.tar.gz"))


async def test_delete_of_a_quarantined_bundle_id_removes_the_file(tmp_path: Path) -> None:
    dirs = [tmp_path / "debug"]
    with trio.fail_after(30):
        bad = unreadable(dirs[0])
        store = store_at(tmp_path, dirs)
        await store.open()
        bundle_id = uuid.UUID(bad.name.removesuffix(".tar.gz"))
        with pytest.raises(NotFound, match="quarantine"):
            await store.get_verified(ZONE, bundle_id)
        assert await store.delete(ZONE, bundle_id)
        assert await store.quarantine() == []
        assert not await store.delete(ZONE, bundle_id)
        (util,) = (await store.utilization()).values()
        assert util.bytes_used == 0


# --- truncation -----------------------------------------------------------------------


async def test_a_bundle_truncated_to_40_percent_is_quarantined_at_start(tmp_path: Path) -> None:
    dirs = [tmp_path / "debug"]
    with trio.fail_after(30):
        whole = await bundle(tmp_path, dirs)
        cut = await bundle(tmp_path, dirs, big=200_000)
        kept = truncate_to(cut.paths[0], 0.4)
        store = store_at(tmp_path, dirs)
        await store.open()
        assert [b.bundle_id for b in await store.list_all()] == [whole.bundle_id]
        assert await store.get(cut.zone_name, cut.bundle_id) is None
        (q,) = await store.quarantine()
        assert q.original_path == cut.paths[0] and q.bytes == kept
        assert q.reason.startswith("truncated")
        (util,) = (await store.utilization()).values()
        assert util.bytes_used == whole.size + kept


async def test_a_bundle_truncated_after_start_is_quarantined_before_it_is_served(
    tmp_path: Path,
) -> None:
    dirs = [tmp_path / "debug"]
    with trio.fail_after(30):
        cut = await bundle(tmp_path, dirs, big=200_000)
        store = store_at(tmp_path, dirs)
        await store.open()
        assert await store.get_verified(cut.zone_name, cut.bundle_id) == cut
        truncate_to(cut.paths[0], 0.4)
        with pytest.raises(NotFound, match=r"quarantine.*truncated"):
            await store.get_verified(cut.zone_name, cut.bundle_id)
        assert await store.list_all() == []
        assert [q.original_path for q in await store.quarantine()] == [cut.paths[0]]


async def test_a_truncated_copy_is_quarantined_and_the_whole_copy_still_served(
    tmp_path: Path,
) -> None:
    dirs = [tmp_path / "m2a", tmp_path / "m2b"]
    with trio.fail_after(30):
        info = await bundle(tmp_path, dirs, big=50_000)
        store = store_at(tmp_path, dirs)
        await store.open()
        truncate_to(info.paths[0], 0.4)
        served = await store.get_verified(info.zone_name, info.bundle_id)
        assert served is not None and served.paths == (info.paths[1],)
        (listed,) = await store.list_all()
        assert listed.paths == (info.paths[1],)
        assert [q.original_path for q in await store.quarantine()] == [info.paths[0]]


def test_a_bundle_cut_at_any_byte_never_passes_the_fast_end_check(tmp_path: Path) -> None:
    info = trio.run(write_bundle, tmp_path, [tmp_path / "d"], ZoneBundleCause.OTHER)
    assert isinstance(info, BundleInfo)
    data = Path(info.paths[0]).read_bytes()
    assert ends_whole(info.paths[0])  # the writer's flush makes it provable
    for cut in range(len(data)):
        assert not stream_ends_whole(io.BytesIO(data[:cut])), cut


def test_a_cut_bundle_is_refused_by_the_full_check_wherever_it_is_cut(tmp_path: Path) -> None:
    info = trio.run(write_bundle, tmp_path, [tmp_path / "d"], ZoneBundleCause.OTHER)
    assert isinstance(info, BundleInfo)
    path = Path(info.paths[0])
    data = path.read_bytes()
    for cut in sorted({1, 10, len(data) // 3, len(data) * 2 // 5, len(data) - 9, len(data) - 1}):
        path.write_bytes(data[:cut])
        with pytest.raises(NotABundle):
            check_bundle(path, tmp_path / "d")
    path.write_bytes(data + b"garbage after the stream")
    with pytest.raises(NotABundle):
        check_bundle(path, tmp_path / "d")


def legacy_bundle(debug_dir: Path, size: int = 100_000) -> tuple[Path, uuid.UUID]:
    """A bundle as a plain ``tar czf`` writes it (no flush before the end: older versions
    of ours, or another writer): only the full check can prove it whole."""
    bundle_id = uuid.uuid4()
    meta = ZoneBundleMetadata(
        cause=ZoneBundleCause.OTHER,
        id=ZoneBundleId(bundle_id=bundle_id, zone_name=ZONE),
        time_created=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
        version=0,
    )
    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb") as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for name, data in (("metadata.toml", metadata_toml(meta)), ("log", os.urandom(size))):
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    path = debug_dir / ZONE / f"{bundle_id}.tar.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(raw.getvalue())
    return path, bundle_id


async def test_a_bundle_without_the_flush_is_proven_whole_by_the_full_check(
    tmp_path: Path,
) -> None:
    dirs = [tmp_path / "debug"]
    whole, whole_id = legacy_bundle(dirs[0])
    cut, _ = legacy_bundle(dirs[0])
    truncate_to(cut, 0.4)
    assert not ends_whole(whole)
    with trio.fail_after(30):
        store = store_at(tmp_path, dirs)
        await store.open()
        assert [b.bundle_id for b in await store.list_all()] == [whole_id]
        assert [q.original_path for q in await store.quarantine()] == [str(cut)]
        served = await store.get_verified(ZONE, whole_id)
        assert served is not None and served.paths == (str(whole),)


# --- everything else in a debug directory ---------------------------------------------------


async def test_stray_files_links_and_fifos_are_counted_and_quarantined_never_followed(
    tmp_path: Path,
) -> None:
    dirs = [tmp_path / "debug"]
    with trio.fail_after(30):
        good = await bundle(tmp_path, dirs)
        outside = tmp_path / "elsewhere.tar.gz"
        outside.write_bytes(Path(good.paths[0]).read_bytes())
        zone_dir = dirs[0] / ZONE
        link = zone_dir / f"{uuid.uuid4()}.tar.gz"
        link.symlink_to(outside)
        fifo = zone_dir / f"{uuid.uuid4()}.tar.gz"
        os.mkfifo(fifo)  # opening it to read would block: it must never be opened
        notes = dirs[0] / "notes.txt"
        notes.write_bytes(b"x" * 300)
        misnamed = zone_dir / "copy.tar.gz"
        misnamed.write_bytes(Path(good.paths[0]).read_bytes())
        store = store_at(tmp_path, dirs)
        await store.open()
        assert [b.bundle_id for b in await store.list_all()] == [good.bundle_id]
        found = {q.original_path: q.reason for q in await store.quarantine()}
    assert set(found) == {str(link), str(fifo), str(notes), str(misnamed)}
    assert found[str(link)] == found[str(fifo)] == "not a regular file"
    assert "not directly in a zone" in found[str(notes)]
    assert "not named" in found[str(misnamed)]
    assert outside.exists()  # the link moved, never what it points to


async def test_a_bundle_being_written_is_counted_and_left_alone(tmp_path: Path) -> None:
    dirs = [tmp_path / "debug"]
    partial = dirs[0] / ZONE / f".{uuid.uuid4()}.tar.gz.tmp"
    partial.parent.mkdir(parents=True)
    store = store_at(tmp_path, dirs)
    store.in_progress.add([partial])  # what an archive does before it creates the file
    try:
        partial.write_bytes(b"half a bundle")
        with trio.fail_after(30):
            await store.open()
            (util,) = (await store.utilization()).values()
            assert util.bytes_used == len(b"half a bundle")
            assert await store.quarantine() == []
    finally:
        store.in_progress.discard([partial])
    assert partial.exists()


async def test_a_file_written_after_start_is_found_at_the_next_scan(tmp_path: Path) -> None:
    dirs = [tmp_path / "debug"]
    with trio.fail_after(30):
        store = store_at(tmp_path, dirs)
        await store.open()
        info = await bundle(tmp_path, dirs)  # another process's bundle: not added
        bad = unreadable(dirs[0])
        (util,) = (await store.utilization()).values()
        assert util.bytes_used == info.size + 5000
        assert [b.bundle_id for b in await store.list_all()] == [info.bundle_id]
        assert [q.original_path for q in await store.quarantine()] == [str(bad)]
        os.unlink(info.paths[0])  # removed behind the agent's back: forgotten
        await store.utilization()
        assert await store.list_all() == []


async def test_a_file_still_being_written_is_judged_at_a_later_scan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dirs = [tmp_path / "debug"]
    growing = unreadable(dirs[0], size=1000)
    import sledagent._bundle_scan as scan

    real = scan.check_bundle

    def writer_still_at_it(path: Path, debug_dir: Path) -> ZoneBundleMetadata:
        if path == growing and growing.stat().st_size < 2000:
            with open(growing, "ab") as f:  # the writer appends while it is read
                f.write(b"y" * 1000)
        return real(path, debug_dir)

    monkeypatch.setattr(scan, "check_bundle", writer_still_at_it)
    with trio.fail_after(30):
        store = store_at(tmp_path, dirs)
        await store.open()
        assert growing.exists()  # not moved mid-write
        (q,) = await store.quarantine()  # the next scan: it stopped changing
    assert q.original_path == str(growing) and q.bytes == 2000


async def test_the_reason_survives_a_restart(tmp_path: Path) -> None:
    dirs = [tmp_path / "debug"]
    with trio.fail_after(30):
        cut = await bundle(tmp_path, dirs, big=100_000)
        truncate_to(cut.paths[0], 0.4)
        first = store_at(tmp_path, dirs)
        await first.open()
        (before,) = await first.quarantine()
        again = store_at(tmp_path, dirs)
        await again.open()
        (after,) = await again.quarantine()
    assert after == before and after.reason.startswith("truncated")
    assert again.statistics().quarantine_files == {str(dirs[0]): 1}


async def test_a_file_put_in_quarantine_by_hand_is_listed_with_no_record(tmp_path: Path) -> None:
    dirs = [tmp_path / "debug"]
    by_hand = dirs[0] / ".quarantine" / ZONE / "thing.bin"
    by_hand.parent.mkdir(parents=True)
    by_hand.write_bytes(b"z" * 42)
    with trio.fail_after(30):
        store = store_at(tmp_path, dirs)
        await store.open()
        (q,) = await store.quarantine()
    assert (q.reason, q.bytes, q.original_path) == (
        "no record",
        42,
        str(dirs[0] / ZONE / "thing.bin"),
    )


# --- over HTTP --------------------------------------------------------------------------


async def test_over_http_a_truncated_bundle_is_404_and_the_quarantine_is_listed_and_exported(
    tmp_path: Path, sled_agent_contract: Contract
) -> None:
    from sledagent.testing import LocalHost

    local = LocalHost.at(tmp_path, log_rate_bps=0, seed_log_bytes=256 << 10, quota_bytes=10 << 30)
    with trio.fail_after(60):
        async with await open_api(local, sled_agent_contract) as api:
            pid = await api.harness.start_vmm()
            zone = f"oxz_propolis-server_{pid}"
            r = await api.call("POST", "/zones/bundles/{zone_name}", 202, path={"zone_name": zone})
            job = r.json()["job_id"]
            while (await api.client.get(f"/zones/bundle-jobs/{job}")).json()["state"] != "done":  # noqa: ASYNC110 (polling over HTTP, as a client would)
                await trio.sleep(0.02)
            (b,) = (await api.call("GET", "/zones/bundles", 200)).json()
            path = {"zone_name": zone, "bundle_id": b["id"]["bundle_id"]}
            (info,) = await local.store.list_all()
            truncate_to(info.paths[0], 0.4)
            r = await api.call("GET", "/zones/bundles/{zone_name}/{bundle_id}", 404, path=path)
            assert r.json()["error_code"] == "NOT_FOUND" and "truncated" in r.json()["message"]
            assert (await api.client.get("/zones/bundles")).json() == []
            stray = unreadable(local.store.debug_dirs[0], zone)
            r = await api.call("GET", "/zones/bundle-cleanup/quarantine", 200)
            listed = {q["original_path"]: q for q in r.json()}
            assert set(listed) == {info.paths[0], str(stray)}
            assert listed[str(stray)]["bytes"] == 5000
            r = await api.call("GET", "/zones/bundle-cleanup/utilization", 200)
            (util,) = r.json().values()
            assert util["bytes_used"] == sum(q["bytes"] for q in listed.values())
            metrics = (await api.client.get("/metrics")).text
            debug_dir = str(local.store.debug_dirs[0])
            assert f'sledagent_bundle_quarantine_files{{debug_dir="{debug_dir}"}} 2.0' in metrics
            assert "sledagent_bundles_quarantined_total 2.0" in metrics
            spec = (await api.client.get("/openapi.json")).json()
            op = spec["paths"]["/zones/bundle-cleanup/quarantine"]["get"]
            assert op["tags"] == ["sledagent"]
            url = str(api.client.base_url)
            out = await cli(url, "quarantine", cwd=tmp_path)
            assert str(stray) in out and "4.88 KiB" in out and info.paths[0] in out
            rows = (await cli(url, "quarantine", "-p", cwd=tmp_path)).splitlines()
            assert any(r.startswith("5000,") and r.split(",")[2] == str(stray) for r in rows)
            (row,) = [q for q in json.loads(await cli(url, "quarantine", "--json", cwd=tmp_path))
                      if q["original_path"] == str(stray)]  # fmt: skip
            assert row["bytes"] == 5000
            local.propolis[pid].halt()
            await local.nexus.wait_for(pid, VmmState.DESTROYED)
            await api.harness.agent.drain()


async def test_scans_racing_new_and_deleted_bundles_leave_the_index_equal_to_the_files(
    tmp_path: Path,
) -> None:
    from sledagent import TarArchiver

    from .test_archive import make_job

    dirs = [tmp_path / "a", tmp_path / "b"]
    store = store_at(tmp_path, dirs)
    archiver = TarArchiver(dirs)
    deleted: list[uuid.UUID] = []
    with trio.fail_after(120):
        await store.open()

        async def writer(i: int) -> None:
            work = tmp_path / f"w{i}"
            work.mkdir()
            info = await archiver.write(make_job(work))
            await store.add(info)
            if i % 3 == 0:
                assert await store.delete(info.zone_name, info.bundle_id)
                deleted.append(info.bundle_id)

        async def scanner(done: trio.Event) -> None:
            while not done.is_set():
                await store.utilization()

        done = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(scanner, done)
            nursery.start_soon(scanner, done)
            async with trio.open_nursery() as writers:
                for i in range(30):
                    writers.start_soon(writer, i)
            done.set()
        await store.utilization()
        indexed = {(b.bundle_id, p) for b in await store.list_all() for p in b.paths}
    on_disk = {
        (uuid.UUID(p.name.removesuffix(".tar.gz")), str(p))
        for d in dirs
        for p in d.glob("*/*.tar.gz")
    }
    assert indexed == on_disk
    assert len({b for b, _ in indexed}) == 20 and not {b for b, _ in indexed} & set(deleted)
    assert await store.quarantine() == []


@pytest.mark.parametrize("level", [0, 1, 2, 3, 4, 9])
async def test_bundles_of_every_compression_level_are_proven_whole_by_their_end(
    tmp_path: Path, level: int
) -> None:
    from sledagent import TarArchiver

    from .test_archive import make_job

    with trio.fail_after(30):
        info = await TarArchiver([tmp_path / "d"], compression_level=level).write(
            make_job(tmp_path, big=300_000)
        )
    assert ends_whole(info.paths[0])  # isal for 0..3, stdlib zlib for 4..9
    assert check_bundle(Path(info.paths[0]), tmp_path / "d") == info.metadata
