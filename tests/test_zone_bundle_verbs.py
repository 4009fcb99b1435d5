"""``sledagent zone-bundle`` as omicron's users type it: verbs, aliases, flags and output,
run as processes against a daemon running in the test."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio

from sledagent import VmmState
from sledagent._daemon import DaemonConfig, DaemonInfo, run_daemon
from sledagent._server import serve_api
from sledagent._zb_format import human_bytes, parse_duration, table
from sledagent.testing import ensure_body_json, fast_config

CLI = [sys.executable, "-c", "from sledagent._cli import main; main()", "zone-bundle"]


@attrs.frozen
class Ran:
    status: int
    out: str
    err: str
    raw: bytes


async def zb(*args: str, cwd: Path) -> Ran:
    env = {k: v for k, v in os.environ.items() if k != "SLEDAGENT_TOKEN"}  # no token
    r = await trio.run_process(
        [*CLI, *args], capture_stdout=True, capture_stderr=True, check=False, cwd=cwd, env=env
    )
    return Ran(r.returncode, r.stdout.decode(errors="replace"), r.stderr.decode(), r.stdout)


@asynccontextmanager
async def agent_with_zones(
    tmp_path: Path, n: int, log_mb: float = 0.2
) -> AsyncIterator[tuple[DaemonInfo, list[str]]]:
    """A daemon with ``n`` running VMMs; yields it and their zone names."""
    config = DaemonConfig(
        listen="127.0.0.1:0",
        data_dir=tmp_path / "data",
        log_rate_bps=8192,
        seed_log_mb=log_mb,
        agent=fast_config(),
    )
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        info: DaemonInfo = await nursery.start(run_daemon, config, shutdown)
        nexus = info.recording_nexus
        assert nexus is not None
        pids = [uuid.uuid4() for _ in range(n)]
        async with httpx.AsyncClient(base_url=info.api_url) as api:
            for pid in pids:
                (await api.put(f"/vmms/{pid}", json=ensure_body_json())).raise_for_status()
                body = {"state": {"type": "running"}}
                (await api.put(f"/vmms/{pid}/state", json=body)).raise_for_status()
            for pid in pids:
                await nexus.wait_for(pid, VmmState.RUNNING)
        yield info, sorted(f"oxz_propolis-server_{pid}" for pid in pids)
        shutdown.set()


async def zb_all(cwd: Path, *calls: tuple[str, ...]) -> list[Ran]:
    """Independent commands at once (each process spends most of its time importing)."""
    results: dict[int, Ran] = {}

    async def one(i: int, args: tuple[str, ...]) -> None:
        results[i] = await zb(*args, cwd=cwd)

    async with trio.open_nursery() as nursery:
        for i, args in enumerate(calls):
            nursery.start_soon(one, i, args)
    return [results[i] for i in range(len(calls))]


async def test_omicron_spellings_of_each_verb_work_against_a_running_agent(
    tmp_path: Path,
) -> None:
    with trio.fail_after(240):
        async with agent_with_zones(tmp_path, 2) as (info, zones):
            url, port = info.api_url, info.api_url.rsplit(":", 1)[1]
            ran = await zb_all(
                tmp_path,
                # Global flags before the verb (omicron's place) and after it.
                ("--url", url, "list-zones"),
                ("list-zones", "--url", url),
                # --port alone: ::1 first (nothing there), then 127.0.0.1, our default.
                ("--port", port, "list-zones"),
                ("--host", "127.0.0.1", "--port", port, "list-zones"),
                ("--url", url, "create", zones[0]),
            )
            assert [r.out.split() for r in ran[:4]] == [zones] * 4
            created = ran[4]
            assert created.status == 0, created.err
            zone, bundle_id = created.out.split()
            assert zone == zones[0]

            (tmp_path / "out").mkdir()
            target = tmp_path / "out" / "b.tar.gz"
            async with httpx.AsyncClient(base_url=url) as api:
                expected = (await api.get(f"/zones/bundles/{zone}/{bundle_id}")).content
                usage: dict[str, Any] = (await api.get("/zones/bundle-cleanup/utilization")).json()
            ((directory, u),) = usage.items()
            (
                listed,
                parseable,
                none,
                got,
                to_stdout,
                default,
                ctx,
                table_,
                raw,
                cleaned,
            ) = await zb_all(
                tmp_path,
                ("--url", url, "ls"),
                ("--url", url, "list", "propolis", "-p", "-o", "zone-name,bundle-id,cause,version"),
                ("--url", url, "ls", "no-such-zone"),
                # get: omicron's --bundle-id, streamed to --output; ours positional, to stdout.
                ("--url", url, "get", zone, "--bundle-id", bundle_id, "--output", str(target)),
                ("--url", url, "get", zone, bundle_id, "--output", "-"),
                ("--url", url, "get", zone, "--bundle-id", bundle_id),
                ("--url", url, "cleanup-context"),
                ("--url", url, "utilization"),
                ("--url", url, "utilization", "-p", "-o", "directory,bytes-used"),
                ("--url", url, "cleanup"),
            )
            lines = listed.out.splitlines()
            assert lines[0].split() == ["Zone", "Bundle", "ID", "Created"]
            assert lines[1].split()[:2] == [zone, bundle_id] and len(lines) == 2
            assert parseable.out == f"{zone},{bundle_id},other,0\n"
            assert none.out == ""
            assert got.status == 0, got.err
            assert target.read_bytes() == expected
            assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["b.tar.gz"]
            assert to_stdout.raw == expected
            with tarfile.open(fileobj=io.BytesIO(expected), mode="r:gz") as tar:
                assert tar.getnames()[0] == "metadata.toml"
            assert (tmp_path / f"{bundle_id}.tar.gz").read_bytes() == expected, default.err

            # The cleanup context, printed as omicron prints it.
            assert ctx.out == "Period: 600s\nPriority: cause, time\nStorage limit: 25%\n"
            # utilization: a table with human sizes and percentages; -p the raw figures.
            table_lines = table_.out.splitlines()
            assert table_lines[0].split("  ")[0] == "Directory"
            assert "% of limit" in table_lines[0] and "% of quota" in table_lines[0]
            row = table_lines[1]
            assert row.startswith(directory) and human_bytes(u["bytes_used"]) in row
            assert f"{u['bytes_used'] * 100 // u['bytes_available']}%" in row
            assert raw.out == f"{directory},{u['bytes_used']}\n"
            assert cleaned.out.splitlines()[0].split() == ["Directory", "Count", "Bytes"]
            assert cleaned.out.splitlines()[1].split() == [directory, "0", "0", "B"]

            changed = await zb(
                "--url", url, "set-cleanup-context", "--period", "10m",
                "--priority", "time,cause", "--storage-limit", "30", cwd=tmp_path,
            )  # fmt: skip
            assert changed.out == "Period: 600s\nPriority: time, cause\nStorage limit: 30%\n"
            alias = await zb("--url", url, "set-context", "--period-s", "3600", cwd=tmp_path)
            assert alias.out == "Period: 3600s\nPriority: time, cause\nStorage limit: 30%\n"

            # delete, by omicron's alias; then it is gone.
            assert (await zb("--url", url, "del", zone, bundle_id, cwd=tmp_path)).status == 0
            missing = str(uuid.uuid4())
            after, gone = await zb_all(
                tmp_path,
                ("--url", url, "ls", "-p"),
                ("--url", url, "get", zone, missing, "--output", str(target)),
            )
            assert after.out == ""
            # The agent's refusal: one line with its status, code and request id; exit 1.
            assert gone.status == 1 and gone.err.count("\n") == 1, gone.err
            assert gone.err.startswith(f"sledagent: GET /zones/bundles/{zone}/{missing}: 404 ")
            assert "NOT_FOUND" in gone.err and "(request id " in gone.err
            assert target.read_bytes() == expected  # a failed get leaves the old file alone


async def test_an_unreachable_agent_is_one_line_and_exit_status_1(tmp_path: Path) -> None:
    with trio.fail_after(60):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        for listener in listeners:
            await listener.aclose()  # nothing listens there now
        ran = await zb("--url", f"http://127.0.0.1:{port}", "ls", cwd=tmp_path)
    assert (ran.status, ran.out) == (1, "")
    assert ran.err == (
        f"sledagent: GET /zones/bundles: cannot reach the agent at "
        f"http://127.0.0.1:{port}: connection refused\n"
    )


async def test_bundle_all_collects_every_live_zone_into_one_tarball(tmp_path: Path) -> None:
    with trio.fail_after(240):
        async with agent_with_zones(tmp_path, 3) as (info, zones):
            out = tmp_path / "all.tar.gz"
            ran = await zb("--url", info.api_url, "bundle-all", "--output", str(out), "-v",
                           cwd=tmp_path)  # fmt: skip
            assert ran.status == 0, ran.err
            async with httpx.AsyncClient(base_url=info.api_url) as api:
                listed = (await api.get("/zones/bundles")).json()
    made = sorted(f"{b['id']['zone_name']}/{b['id']['bundle_id']}.tar.gz" for b in listed)
    assert len(made) == 3 and sorted(b["cause"] for b in listed) == ["other"] * 3
    assert sorted(line.removeprefix("Added bundle: ") for line in ran.out.splitlines()) == made
    with tarfile.open(out, "r:gz") as tar:
        names = tar.getnames()
        assert sorted(n for n in names if n.endswith(".tar.gz")) == made
        assert sorted(n for n in names if not n.endswith(".tar.gz")) == zones
        for name in made:
            inner = tar.extractfile(name)
            assert inner is not None
            with tarfile.open(fileobj=io.BytesIO(inner.read()), mode="r:gz") as bundle:
                assert bundle.getnames()[0] == "metadata.toml"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


async def test_a_closed_pipe_ends_the_command_quietly(tmp_path: Path) -> None:
    """``get --output - | head -c 16``: the reader leaves; the CLI stops, prints nothing
    and exits as a process killed by SIGPIPE would (141)."""
    with trio.fail_after(240):
        async with agent_with_zones(tmp_path, 1, log_mb=4) as (info, zones):
            created = await zb("--url", info.api_url, "create", zones[0], cwd=tmp_path)
            bundle_id = created.out.split()[1]
            async with httpx.AsyncClient(base_url=info.api_url) as api:
                size = len((await api.get(f"/zones/bundles/{zones[0]}/{bundle_id}")).content)
            assert size > 256 << 10  # more than a pipe's buffer holds (64 KiB on Linux)
            proc = await trio.lowlevel.open_process(
                [*CLI, "--url", info.api_url, "get", zones[0], bundle_id, "--output", "-"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            assert proc.stdout is not None and proc.stderr is not None
            assert len(await proc.stdout.receive_some(16)) > 0
            await proc.stdout.aclose()  # the reader leaves
            err = b""
            while chunk := await proc.stderr.receive_some():
                err += chunk
            status = await proc.wait()
            await proc.stderr.aclose()
    assert (status, err) == (128 + signal.SIGPIPE, b"")


def _cut_short(announced: int, sent: int) -> Any:
    """An ASGI app that announces ``announced`` bytes, sends ``sent`` and fails."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", str(announced).encode())],
            }
        )
        await send({"type": "http.response.body", "body": b"x" * sent, "more_body": True})
        raise RuntimeError("the agent died mid-transfer")

    return app


async def test_an_interrupted_download_leaves_no_file_behind(tmp_path: Path) -> None:
    stop = trio.Event()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(
                lambda task_status: serve_api(
                    _cut_short(4 << 20, 1 << 20),
                    listen="127.0.0.1:0",
                    shutdown=stop,
                    task_status=task_status,
                )
            )
            bundle_id = str(uuid.uuid4())
            ran = await zb("--url", binds[0], "get", "z", "--bundle-id", bundle_id,
                           "--output", str(tmp_path / "b.tar.gz"), cwd=tmp_path)  # fmt: skip
            stop.set()
    assert ran.status == 1 and ran.err.count("\n") == 1, ran.err
    assert ran.err == (
        f"sledagent: the agent's answer to GET /zones/bundles/z/{bundle_id} was malformed: "
        f"it ended after {1 << 20} of {4 << 20} bytes\n"
    )
    assert list(tmp_path.iterdir()) == []


def test_sizes_and_durations_read_as_omicron_writes_them() -> None:
    assert [human_bytes(n) for n in (0, 1023, 1024, 1536, 5 << 20, 3 << 30, 2 << 40)] == [
        "0 B", "1023 B", "1.00 KiB", "1.50 KiB", "5.00 MiB", "3.00 GiB", "2.00 TiB",
    ]  # fmt: skip
    assert [parse_duration(t) for t in ("600", "600s", "10m", "1h30m", "1d")] == [
        600, 600, 600, 5400, 86400,
    ]  # fmt: skip
    assert table(["A", "Long header"], [["x", "1"], ["yyyy", "22"]]) == [
        "A     Long header",
        "x     1",
        "yyyy  22",
    ]
