"""The restart drill on the embedded default, over real processes: the daemon is killed
(kill -9) or stopped (SIGTERM, an upgrade) with guests running, and a new one takes them
back. The simulated guests live in the sim host process, which outlives the agent as a
real Propolis zone does (``sim/_spawn.py``)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from sledagent._host import zone_name_for
from sledagent._local_zones import LOG_SUBDIR
from sledagent._logwriter import SERVICE_LOG
from sledagent.sim._spawn import read_state
from sledagent.testing import RetryOverloaded, ensure_body_json

RUN = {"state": {"type": "running"}}
STOP = {"state": {"type": "stopped"}}
CONFIG = """
listen = "127.0.0.1:0"
data_dir = "{data_dir}"
log_rate_bps = 4096
[agent]
propolis_unreachable_s = 3.0
shutdown_drain_s = 20.0
reaper_backoff = {{ initial_s = 0.05, max_s = 1.0 }}
"""


class Daemon:
    """``sledagent run`` as a process of its own, as an operator starts it. Every one
    started is killed at the test's end whatever the outcome (``_no_daemon_outlives``)."""

    started: list[trio.Process] = []

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.config = data_dir.parent / f"{data_dir.name}.toml"
        self.config.write_text(CONFIG.format(data_dir=data_dir))
        self.proc: trio.Process | None = None
        self.api = ""
        self.nexus = ""

    async def start(self) -> None:
        argv = [sys.executable, "-c", "from sledagent._cli import main; main()", "run",
                "--config", str(self.config)]  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.log = self.data_dir.parent / f"{self.data_dir.name}.log"
        err = await trio.to_thread.run_sync(open, self.log, "ab")
        try:
            self.proc = await trio.lowlevel.open_process(
                argv, stdout=subprocess.PIPE, stderr=err, env=env
            )
        finally:
            err.close()
        Daemon.started.append(self.proc)
        assert self.proc.stdout is not None
        buf = b""
        while b"\n" not in buf:
            chunk = await self.proc.stdout.receive_some()
            if not chunk:
                await self.proc.wait()
                tail = self.log.read_text()[-2000:]
                raise AssertionError(f"the daemon exited before listening; its log:\n{tail}")
            buf += chunk
        words = buf.split(b"\n", 1)[0].decode().split()
        # "sledagent listening on <api> (Nexus: <nexus>)"
        self.api, self.nexus = words[3], words[5].rstrip(")")

    async def stop(self, signo: int) -> int:
        assert self.proc is not None
        self.proc.send_signal(signo)
        code = await self.proc.wait()
        if self.proc.stdout is not None:
            await self.proc.stdout.aclose()
        return code


@pytest.fixture(autouse=True)
def _no_daemon_outlives() -> Iterator[None]:
    """A failed assert must not leave a daemon (and its archive workers) running."""
    yield
    while Daemon.started:
        proc = Daemon.started.pop()
        if proc.returncode is None:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc._proc.wait(10)  # synchronous: the test's trio run is over


def zone_meta(data_dir: Path, pid: uuid.UUID) -> dict[str, Any]:
    return json.loads((data_dir / "zones" / zone_name_for(pid) / "zone.json").read_text())


def log_size(data_dir: Path, pid: uuid.UUID) -> int:
    return (data_dir / "zones" / zone_name_for(pid) / LOG_SUBDIR / SERVICE_LOG).stat().st_size


async def nexus_wait(
    client: httpx.AsyncClient, nexus: str, pids: list[uuid.UUID], state: str
) -> None:
    body = {"ids": [str(p) for p in pids], "state": state, "timeout_s": 60}
    r = await client.post(f"{nexus}/sim/wait", json=body, timeout=70)
    assert r.status_code == 200, r.text


async def nexus_states(client: httpx.AsyncClient, nexus: str) -> list[dict[str, Any]]:
    return (await client.get(f"{nexus}/sim/updates")).json()  # type: ignore[no-any-return]


async def start_vmms(client: httpx.AsyncClient, daemon: Daemon, n: int) -> list[uuid.UUID]:
    pids = [uuid.uuid4() for _ in range(n)]
    for pid in pids:
        r = await client.put(f"{daemon.api}/vmms/{pid}", json=ensure_body_json())
        assert r.status_code == 200, r.text
        r = await client.put(f"{daemon.api}/vmms/{pid}/state", json=RUN)
        assert r.status_code == 200, r.text
    await nexus_wait(client, daemon.nexus, pids, "running")
    return pids


@pytest.mark.parametrize("signo", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
async def test_a_restart_with_20_running_vmms_costs_no_guest(signo: int, tmp_path: Path) -> None:
    data_dir = tmp_path / "sled"
    daemon = Daemon(data_dir)
    with trio.fail_after(150):
        async with httpx.AsyncClient(timeout=30, transport=RetryOverloaded()) as client:
            await daemon.start()
            pids = await start_vmms(client, daemon, 20)
            states = {
                pid: (await client.get(f"{daemon.api}/vmms/{pid}/state")).json() for pid in pids
            }
            addrs = {pid: zone_meta(data_dir, pid)["propolis_addr"] for pid in pids}
            sim_pid = read_state(data_dir).pid  # type: ignore[union-attr]
            code = await daemon.stop(signo)
            assert code == (0 if signo == signal.SIGTERM else -signal.SIGKILL)
            sizes = {pid: log_size(data_dir, pid) for pid in pids}

            daemon = Daemon(data_dir)
            await daemon.start()
            for pid in pids:  # the first read answers what Nexus was last told
                r = await client.get(f"{daemon.api}/vmms/{pid}/state")
                assert r.status_code == 200 and r.json() == states[pid]
            host = read_state(data_dir)
            assert host is not None and host.pid == sim_pid  # the same guests, not new ones
            # Their Propolis were never restarted: the same address, and their logs grew.
            await trio.sleep(1.0)  # (the guests write a line every 0.5 s)
            for pid in pids:
                assert zone_meta(data_dir, pid)["propolis_addr"] == addrs[pid]
                assert log_size(data_dir, pid) > sizes[pid]
            updates = await nexus_states(client, daemon.nexus)
            assert not [u for u in updates if u["state"]["vmm_state"]["state"] == "failed"]

            for pid in pids[:10]:
                r = await client.put(f"{daemon.api}/vmms/{pid}/state", json=STOP)
                assert r.status_code == 200, r.text
            await nexus_wait(client, daemon.nexus, pids[:10], "destroyed")
            for pid in pids[10:]:
                r = await client.get(f"{daemon.api}/vmms/{pid}/state")
                assert r.json()["vmm_state"]["state"] == "running"
            bundles: list[dict[str, Any]] = []
            with trio.fail_after(60):
                while len(bundles) < 10:
                    bundles = (await client.get(f"{daemon.api}/zones/bundles")).json()
                    await trio.sleep(0.1)
            assert {b["id"]["zone_name"] for b in bundles} == {zone_name_for(p) for p in pids[:10]}
            assert {b["cause"] for b in bundles} == {"terminated_instance"}
            assert await daemon.stop(signal.SIGTERM) == 0
    # Generations Nexus saw never went back, and a repeat was the same state.
    seen: dict[tuple[str, int], Any] = {}
    for u in updates:
        key = (u["propolis_id"], u["state"]["vmm_state"]["gen"])
        assert seen.setdefault(key, u["state"]) == u["state"]


async def test_vmms_that_ended_while_the_agent_was_down_are_told_and_bundled(
    tmp_path: Path,
) -> None:
    """One guest's Propolis dies (unreachable: failed after the bound), one VMM was
    killed mid-stop (its halt unseen: destroyed after the restart)."""
    data_dir = tmp_path / "sled"
    daemon = Daemon(data_dir)
    with trio.fail_after(150):
        async with httpx.AsyncClient(timeout=30, transport=RetryOverloaded()) as client:
            await daemon.start()
            dead, stopping, fine = await start_vmms(client, daemon, 3)
            host = read_state(data_dir)
            assert host is not None
            # Mid-stop: its monitor hears nothing, the stop reaches Propolis, the guest
            # halts; the agent dies before it learns so.
            stopping_addr = zone_meta(data_dir, stopping)["propolis_addr"]
            await client.post(f"http://{stopping_addr}/sim/hang")
            r = await client.put(f"{daemon.api}/vmms/{stopping}/state", json=STOP)
            assert r.json()["updated_runtime"]["vmm_state"]["state"] == "stopping"
            await daemon.stop(signal.SIGKILL)
            await client.post(f"http://{stopping_addr}/sim/hang?on=false")
            r = await client.delete(
                f"{host.fleet_url}/fleet/zones/{zone_name_for(dead)}", params={"kill": "true"}
            )
            assert r.status_code == 204

            daemon = Daemon(data_dir)
            await daemon.start()
            await nexus_wait(client, daemon.nexus, [stopping], "destroyed")
            await nexus_wait(client, daemon.nexus, [dead], "failed")
            r = await client.get(f"{daemon.api}/vmms/{fine}/state")
            assert r.json()["vmm_state"]["state"] == "running"
            bundles: list[dict[str, Any]] = []
            with trio.fail_after(60):
                while len(bundles) < 2:
                    bundles = (await client.get(f"{daemon.api}/zones/bundles")).json()
                    await trio.sleep(0.1)
            assert {b["id"]["zone_name"] for b in bundles} == {
                zone_name_for(dead),
                zone_name_for(stopping),
            }
            assert await daemon.stop(signal.SIGTERM) == 0


async def test_a_second_daemon_on_the_same_data_dir_is_refused_in_one_line(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "sled"
    first = Daemon(data_dir)
    with trio.fail_after(60):
        await first.start()
        try:
            argv = [sys.executable, "-c", "from sledagent._cli import main; main()", "run",
                    "--config", str(first.config)]  # fmt: skip
            result = await trio.run_process(
                argv, capture_stdout=True, capture_stderr=True, check=False
            )
            assert result.returncode == 1
            err = result.stderr.decode().strip()
            assert err.count("\n") == 0 and "in use by another sledagent" in err, err
        finally:
            await first.stop(signal.SIGTERM)
