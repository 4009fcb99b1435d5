"""``sledagent bench crash``: kill -9 the daemon mid-cleanup, restart it, check nothing leaked.

One point: a ``sledagent sim`` process (recording Nexus, simulated Propolis per zone) that
outlives the agent; the daemon as a process of its own on local zones with real logs and
real bundles. VMMs are registered and run over HTTP, all guests halt at once, and after
a seeded delay (somewhere in the pipeline: publishing, commands, snapshots, archiving,
teardown) the daemon gets SIGKILL. It is started again on the same data directory and
left until the reaper is idle. Then, on disk and at Nexus:

- no partial bundle file (temporary names) in any debug directory;
- no snapshot left; no zone left on the host (nobody owns them after a crash: the
  startup sweep bundles them as ``unexpected_zone`` and tears them down);
- every bundle opens and its ``metadata.toml`` names the zone and bundle id of its path;
- every VMM's zone has a bundle (one the kill cut short in phase 2 is finished from its
  snapshot at the next start; a zone still on the host is bundled as unexpected);
- every VMM's terminal state reached Nexus (the journal of unacknowledged states is
  replayed by the next start); one missing is a leak.
"""

from __future__ import annotations

import random
import signal
import tempfile
import uuid
from pathlib import Path

import attrs
import httpx
import trio

from .._archive import BUNDLE_SUFFIX, TMP_SUFFIX
from .._bundle_check import read_bundle_metadata
from .._host import zone_name_for
from .._retry_after import RetryOverloaded
from .._wire import VmmState
from ..testing import ensure_body_json
from ._procs import daemon_config, nexus_first_times, sim_process, start_daemon, stop_process


@attrs.frozen(kw_only=True)
class CrashParams:
    vmms: int = 8
    log_mb: float = 20.0
    #: The kill comes this long after the halt (the range a seed draws from); with the
    #: defaults the whole cleanup takes about 1-2 s here, so kills land all along it.
    max_delay_s: float = 1.5
    #: SIGKILL (a crash) or SIGTERM (a shutdown: the daemon drains for ``drain_s``, exits
    #: 0, and the next start finishes the rest).
    signal: str = "SIGKILL"
    drain_s: float = 60.0


async def run_crash_point(seed: int, p: CrashParams) -> dict[str, object]:
    delay = random.Random(seed).uniform(0.0, p.max_delay_s)
    async with sim_process() as (nexus_url, fleet_url):
        with tempfile.TemporaryDirectory(prefix="sledagent-crash-") as tmp:
            root = Path(tmp)
            config = root / "sledagent.toml"
            agent = (
                "reaper_backoff = { initial_s = 0.05, max_s = 1.0 }\n"
                f"shutdown_drain_s = {p.drain_s}\n"
            )
            text = daemon_config(root, nexus_url, fleet_url, log_mb=p.log_mb, agent=agent)
            await trio.Path(config).write_text(text)
            log = root / "daemon.log"
            pids = [uuid.uuid4() for _ in range(p.vmms)]
            async with httpx.AsyncClient(timeout=60, transport=RetryOverloaded()) as client:
                proc, url = await start_daemon(config, log)
                try:
                    for pid in pids:
                        r = await client.put(f"{url}/vmms/{pid}", json=ensure_body_json())
                        r.raise_for_status()
                        run = {"state": {"type": "running"}}
                        (await client.put(f"{url}/vmms/{pid}/state", json=run)).raise_for_status()
                    await nexus_first_times(client, nexus_url, pids, VmmState.RUNNING)
                    zones = [zone_name_for(pid) for pid in pids]
                    (await client.post(f"{fleet_url}/fleet/halt", json=zones)).raise_for_status()
                    await trio.sleep(delay)
                    t_signal = trio.current_time()
                finally:
                    exit_status = await stop_process(proc, signal.Signals[p.signal])
                stop_s = trio.current_time() - t_signal
                killed_with = await _holdings(root / "data")
                proc, url = await start_daemon(config, log)
                try:
                    with trio.fail_after(300):
                        while (await client.get(f"{url}/zones/cleanup")).json() or (  # noqa: ASYNC110
                            await client.get(f"{url}/zones")
                        ).json():
                            await trio.sleep(0.1)
                finally:
                    await stop_process(proc, signal.SIGTERM)
                updates = (await client.get(f"{nexus_url}/sim/updates")).json()
            destroyed = {
                u["propolis_id"]
                for u in updates
                if u["state"]["vmm_state"]["state"] in ("destroyed", "failed")
            }
            result = await trio.to_thread.run_sync(_inspect, root / "data")
            bundled = set(result.pop("bundled_zones"))  # type: ignore[call-overload]
            result["zones_without_bundle"] = sorted({zone_name_for(pid) for pid in pids} - bundled)
    return {
        "seed": seed,
        "kill_after_s": round(delay, 3),
        "signal": p.signal,
        "exit_status": exit_status,
        "exit_after_signal_s": round(stop_s, 3),
        "at_kill": killed_with,
        **result,
        "terminal_states_delivered": len(destroyed & {str(p) for p in pids}),
        "vmms": p.vmms,
    }


async def _holdings(data: Path) -> dict[str, int]:
    """What the crash left on disk, before the restart (where the kill landed)."""

    def count() -> dict[str, int]:
        debug = data / "debug"
        return {
            "zones": len(list((data / "zones").glob("*"))) if (data / "zones").exists() else 0,
            "snapshots": len(list((data / "snapshots").glob("*")))
            if (data / "snapshots").exists()
            else 0,
            "partial_files": len(list(debug.glob(f"*/*{TMP_SUFFIX}"))),
            "bundles": len(list(debug.glob(f"*/*{BUNDLE_SUFFIX}"))),
        }

    return await trio.to_thread.run_sync(count)


def _inspect(data: Path) -> dict[str, object]:
    debug = data / "debug"
    bad = []
    bundles = list(debug.glob(f"*/*{BUNDLE_SUFFIX}"))
    for path in bundles:
        try:
            meta = read_bundle_metadata(path)
            if (meta.id.zone_name, f"{meta.id.bundle_id}{BUNDLE_SUFFIX}") != (
                path.parent.name,
                path.name,
            ):
                bad.append(f"{path.name}: metadata names another bundle")
        except ValueError as exc:
            bad.append(f"{path.name}: {exc}")
    snaps = data / "snapshots"
    zones = data / "zones"
    return {
        "bundles": len(bundles),
        "bundled_zones": sorted({path.parent.name for path in bundles}),
        "bad_bundles": bad,
        "partial_files": len(list(debug.glob(f"*/*{TMP_SUFFIX}"))),
        "snapshots_left": len(list(snaps.iterdir())) if snaps.exists() else 0,
        "zones_left": len(list(zones.iterdir())) if zones.exists() else 0,
        # What a leftover zone holds: which writer outlived its teardown.
        "zones_left_files": sorted(
            str(f.relative_to(zones)) for f in zones.rglob("*") if f.is_file()
        )[:20]
        if zones.exists()
        else [],
    }


def leaks(result: dict[str, object]) -> list[str]:
    """What a crash point left that it must not."""
    found = []
    for key in ("partial_files", "snapshots_left", "zones_left"):
        if result[key]:
            found.append(f"{key}={result[key]}")
    for key in ("bad_bundles", "zones_without_bundle", "zones_left_files"):
        if result[key]:
            found.append(f"{key}={result[key]}")
    lost = int(str(result["vmms"])) - int(str(result["terminal_states_delivered"]))
    if lost:
        found.append(f"terminal_states_lost={lost}")
    if result["signal"] == "SIGTERM" and result["exit_status"] != 0:
        found.append(f"exit_status={result['exit_status']}")
    return found
