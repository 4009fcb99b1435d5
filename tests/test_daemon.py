"""The daemon on the embedded default, driven as Nexus would, and its CLI process."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path

import httpx
import pytest
import trio

from sledagent import VmmState
from sledagent._daemon import ConfigError, DaemonConfig, config_from_toml, run_daemon
from sledagent.testing import RetryOverloaded, ensure_body_json, fast_config

from .conftest import Contract


async def test_the_embedded_default_runs_stops_and_bundles_vmms_over_http(
    tmp_path: Path, sled_agent_contract: Contract
) -> None:
    config = DaemonConfig(
        listen="127.0.0.1:0", data_dir=tmp_path, log_rate_bps=8192, seed_log_mb=0.25,
        agent=fast_config(),
    )  # fmt: skip
    shutdown = trio.Event()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            info = await nursery.start(run_daemon, config, shutdown)
            nexus = info.recording_nexus
            assert nexus is not None
            async with httpx.AsyncClient(
                base_url=info.api_url, timeout=10, transport=RetryOverloaded()
            ) as api:
                pids = [uuid.uuid4() for _ in range(2)]
                for pid in pids:
                    r = await api.put(f"/vmms/{pid}", json=ensure_body_json())
                    assert r.status_code == 200, r.text
                    r = await api.put(f"/vmms/{pid}/state", json={"state": {"type": "running"}})
                    assert r.status_code == 200, r.text
                for pid in pids:
                    await nexus.wait_for(pid, VmmState.RUNNING)
                    r = await api.put(f"/vmms/{pid}/state", json={"state": {"type": "stopped"}})
                    assert r.status_code == 200, r.text
                    # "destroyed" when the simulated guest halted before the answer left
                    state = r.json()["updated_runtime"]["vmm_state"]["state"]
                    assert state in ("stopping", "destroyed")
                for pid in pids:
                    await nexus.wait_for(pid, VmmState.DESTROYED)
                await info.agent.drain()
                r = await api.get("/zones/bundles")
                sled_agent_contract.validate_response("GET", "/zones/bundles", 200, r.json())
                zones = {b["id"]["zone_name"] for b in r.json()}
                assert zones == {f"oxz_propolis-server_{pid}" for pid in pids}
                b = r.json()[0]
                r = await api.get(f"/zones/bundles/{b['id']['zone_name']}/{b['id']['bundle_id']}")
                with tarfile.open(fileobj=io.BytesIO(r.content), mode="r:gz") as tar:
                    names = tar.getnames()
                assert "oxide-propolis-server:default.log" in names
                assert (await api.get("/zones")).json() == []
            shutdown.set()
    assert not (tmp_path / "zones").exists() or list((tmp_path / "zones").iterdir()) == []


def test_a_valid_config_file_is_read_with_its_nested_tables() -> None:
    cfg = config_from_toml(
        """
        listen = "127.0.0.1:0"
        data_dir = "/tmp/x"
        propolis = "external"
        [agent]
        stop_grace_s = 30
        max_zones = 10
        reaper_backoff = { initial_s = 0.5, max_s = 5 }
        """
    )
    assert cfg.propolis == "external" and cfg.agent.stop_grace_s == 30
    assert cfg.agent.reaper_backoff.max_s == 5
    assert cfg.bundle_dirs() == [Path("/tmp/x/debug")]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("lissen = 'x'", "lissen"),
        ("[agent]\nmax_zone = 3", "max_zone"),
        ("[agent]\nmax_zones = 0", "max_zones"),
        ("[agent]\ntermination_policy = 'later'", "later"),
        ("listen = ", "not valid TOML"),
    ],
)
def test_a_bad_config_is_refused_naming_the_key(text: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        config_from_toml(text)


async def test_the_cli_daemon_serves_and_exits_0_on_sigterm(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-c", "from sledagent._cli import main; main()", "run",
            "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path)]  # fmt: skip
    with trio.fail_after(60):
        proc = await trio.lowlevel.open_process(
            argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env
        )
        try:
            assert proc.stdout is not None
            buf = b""
            while b"\n" not in buf:
                chunk = await proc.stdout.receive_some()
                assert chunk, "the daemon exited before listening"
                buf += chunk
            line = buf.split(b"\n", 1)[0].decode()
            assert line.startswith("sledagent listening on http://127.0.0.1:"), line
            url = line.split()[3]
            async with httpx.AsyncClient(base_url=url) as api:
                assert (await api.get("/zones")).status_code == 200
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            if proc.stdout is not None:
                await proc.stdout.aclose()


async def test_vmms_launched_through_a_sim_host_run_log_bundle_and_are_retired(
    tmp_path: Path,
) -> None:
    """``propolis = "remote"``: each zone's Propolis lives in the sim host, writes its log
    into the agent's zone, and is stopped there once the zone is gone."""
    from sledagent.sim._host import run_sim_host

    shutdown = trio.Event()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nexus_url, fleet_url = await nursery.start(
                lambda task_status: run_sim_host(shutdown=shutdown, task_status=task_status)
            )
            config = DaemonConfig(
                listen="127.0.0.1:0", data_dir=tmp_path, log_rate_bps=8192, seed_log_mb=0.25,
                nexus_url=nexus_url, propolis="remote", sim_fleet_url=fleet_url,
                agent=fast_config(),
            )  # fmt: skip
            info = await nursery.start(run_daemon, config, shutdown)
            pid = uuid.uuid4()
            zone = f"oxz_propolis-server_{pid}"
            async with (
                httpx.AsyncClient(
                    base_url=info.api_url, timeout=10, transport=RetryOverloaded()
                ) as api,
                httpx.AsyncClient(base_url=nexus_url, timeout=30) as nexus,
                httpx.AsyncClient(base_url=fleet_url, timeout=10) as fleet,
            ):
                assert (await api.put(f"/vmms/{pid}", json=ensure_body_json())).status_code == 200
                r = await api.put(f"/vmms/{pid}/state", json={"state": {"type": "running"}})
                assert r.status_code == 200, r.text
                wait = {"ids": [str(pid)], "timeout_s": 20}
                r = await nexus.post("/sim/wait", json={**wait, "state": "running"})
                assert r.status_code == 200, r.text
                r = await api.put(f"/vmms/{pid}/state", json={"state": {"type": "stopped"}})
                assert r.status_code == 200, r.text
                r = await nexus.post("/sim/wait", json={**wait, "state": "destroyed"})
                assert r.status_code == 200, r.text
                await info.agent.drain()
                bundles = (await api.get("/zones/bundles")).json()
                assert [b["id"]["zone_name"] for b in bundles] == [zone]
                bid = bundles[0]["id"]["bundle_id"]
                r = await api.get(f"/zones/bundles/{zone}/{bid}")
                with tarfile.open(fileobj=io.BytesIO(r.content), mode="r:gz") as tar:
                    log = tar.extractfile("oxide-propolis-server:default.log")
                    assert log is not None and log.read()  # written by the sim host's Propolis
                # Retired: the sim host no longer has a guest for that zone to halt. (The
                # sim host hears of it from the reaper's teardown; the test's deadline
                # bounds the wait, not a count of polls.)
                while (await fleet.post("/fleet/halt", json=[zone])).json() != {}:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            shutdown.set()
