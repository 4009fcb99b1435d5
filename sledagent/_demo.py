"""``sledagent demo``: the two policies side by side on the fake host (part 1), then the
daemon on the embedded default, driven over HTTP as Nexus would (part 2), then a restart
of the agent with a guest running, which the new agent takes back untouched (part 3).

What it prints is made from what it measured: the table and the sentences under it come
from the same report, and the lines to paste are complete commands.
"""

from __future__ import annotations

import shlex
import sys
import uuid
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio
from rich.console import Console

from ._bench_cli import policy_table
from ._config import TerminationPolicy
from ._daemon import DaemonConfig, DaemonInfo, run_daemon
from ._failures import ListenError
from ._host import zone_name_for
from ._local_zones import LOG_SUBDIR
from ._log import configure_logging
from ._logwriter import SERVICE_LOG
from ._retry_after import RetryOverloaded
from ._wire import VmmState
from .bench._mass_stop import MassStopParams, run_mass_stop
from .sim._spawn import RemoteNexusView
from .testing import FakeNexus, ensure_body_json, fast_config


@attrs.frozen
class DemoBundle:
    zone: str
    cause: str
    bundle_id: str


async def drive_scenario(info: DaemonInfo, vmms: int) -> list[DemoBundle]:
    """As Nexus would: register VMMs, run them, stop them; then list their bundles."""
    nexus = info.recording_nexus
    async with httpx.AsyncClient(
        base_url=info.api_url, timeout=30, transport=RetryOverloaded()
    ) as api:
        pids = [uuid.uuid4() for _ in range(vmms)]
        for pid in pids:
            (await api.put(f"/vmms/{pid}", json=ensure_body_json())).raise_for_status()
            body = {"state": {"type": "running"}}
            (await api.put(f"/vmms/{pid}/state", json=body)).raise_for_status()
        if nexus is not None:
            for pid in pids:
                await nexus.wait_for(pid, VmmState.RUNNING)
        await trio.sleep(1.0)  # let the zones' processes write some logs
        for pid in pids:
            body = {"state": {"type": "stopped"}}
            (await api.put(f"/vmms/{pid}/state", json=body)).raise_for_status()
        if nexus is not None:
            for pid in pids:
                await nexus.wait_for(pid, VmmState.DESTROYED)
        await info.agent.drain()
        wanted = {f"oxz_propolis-server_{pid}" for pid in pids}
        listed = (await api.get("/zones/bundles")).json()
    return [
        DemoBundle(b["id"]["zone_name"], b["cause"], b["id"]["bundle_id"])
        for b in listed
        if b["id"]["zone_name"] in wanted
    ]


def demo_config(data_dir: Path, listen: str, log_mb: float) -> DaemonConfig:
    return DaemonConfig(
        listen=listen,
        data_dir=data_dir,
        log_rate_bps=8192,
        seed_log_mb=log_mb,
        agent=fast_config(),
    )


def ratio_text(report: dict[str, object]) -> str:
    """``118.3x`` (inline p99 / reaper p99), or why there is none."""
    ratio = report.get("ratios", {}).get("halt_to_publish_p99")  # type: ignore[attr-defined]
    return f"{ratio:g}x" if isinstance(ratio, int | float) else "n/a (a p99 of 0)"


def findings(report: dict[str, object], get_timeout_s: float) -> list[str]:
    """One sentence per policy, from its figures (never claims what was not measured)."""
    policies: dict[str, dict[str, dict[str, float]]] = report["policies"]  # type: ignore[assignment]
    lines = []
    for name, what in (
        ("reaper", "reaper: each halt is published at once, zones bundled behind it"),
        ("inline", "inline (omicron): each halt waits for its bundle behind a host-wide lock"),
    ):
        p = policies.get(name)
        if p is None:
            continue
        h, g = p["halt_to_publish_s"], p["get_state_s"]
        timeouts = int(g["timeouts"])
        total = int(g["reads"]) + timeouts
        reads = (
            f"{timeouts} of {total} reads timed out (after {get_timeout_s:g} s)"
            if timeouts
            else f"every read answered within {get_timeout_s:g} s"
        )
        lines.append(
            f"{what}: halt->publish p99 {h['p99']:.3g} s; GET state p99 {g['p99']:.3g} s, {reads}."
        )
    return lines


async def _start_daemon(
    nursery: trio.Nursery, data_dir: Path, listen: str, log_mb: float, shutdown: trio.Event
) -> DaemonInfo:
    try:
        info: DaemonInfo = await nursery.start(
            run_daemon, demo_config(data_dir, listen, log_mb), shutdown
        )
    except* ListenError:  # the default port is taken: any free one will do
        config = demo_config(data_dir, "127.0.0.1:0", log_mb)
        info = await nursery.start(run_daemon, config, shutdown)
    return info


async def run_demo(
    *,
    vmms: int,
    bundle_s: float,
    data_dir: Path,
    listen: str,
    log_mb: float,
    exit_after: bool,
    shutdown: trio.Event,
) -> None:
    """Both parts; with ``exit_after`` it returns after part 2's scenario, otherwise
    when ``shutdown`` is set (Ctrl-C)."""
    configure_logging(json=False, level="error")
    console = Console()
    params = MassStopParams(vmms=vmms, command_s=bundle_s / 2, copy_s=bundle_s / 2)
    console.print(
        f"[bold]1.[/] {vmms} VMMs on the fake host halt at once, bundles of {bundle_s:g} s "
        "each; first with the reaper, then inline (omicron)..."
    )
    report = await run_mass_stop([TerminationPolicy.REAPER, TerminationPolicy.INLINE], params)
    console.print(policy_table(report, f"{vmms} VMMs halting at once"))
    console.print(f"inline / reaper, halt->publish p99: {ratio_text(report)}")
    for line in findings(report, params.get_timeout_s):
        console.print(line, soft_wrap=True, highlight=False)
    print()
    data_dir = Path(await trio.Path(data_dir).resolve())
    first_stop = trio.Event()
    async with trio.open_nursery() as nursery:
        info = await _start_daemon(nursery, data_dir, listen, log_mb, first_stop)
        console.print(f"[bold]2.[/] The daemon listens on {info.api_url}; driving three VMMs...")
        bundles = await drive_scenario(info, vmms=3)
        console.print(f"bundles of the three VMMs (files under {data_dir}/debug/):")
        for b in bundles:
            console.print(f"  {b.zone}  {b.cause}  {b.bundle_id}", soft_wrap=True)
        survivor = await start_survivor(info, data_dir)
        listen = info.api_url.removeprefix("http://")  # the same address after the restart
        first_stop.set()  # as SIGTERM does: the agent stops, its guest does not
    console.print(
        f"[bold]3.[/] One more VMM running ({survivor.pid}); the agent stopped, as for an "
        "upgrade, and starts again on the same data directory..."
    )
    async with trio.open_nursery() as nursery:
        info = await _start_daemon(nursery, data_dir, listen, log_mb, shutdown)
        for line in await check_survivor(info, survivor):
            console.print(f"  {line}", soft_wrap=True, highlight=False)
        # Plain print, one command per line: a terminal's wrapping never splits them.
        if exit_after:
            listen_at = info.api_url.removeprefix("http://")
            again = f"{_this_command()} run --data-dir {shlex.quote(str(data_dir))}"
            print(f"Stopping (--exit-after). To look again: {again} --listen {listen_at}, then:")
        else:
            print("Talk to it (Ctrl-C to stop; its guest keeps running, for the next start):")
        for line in paste_lines(info.api_url, bundles[0] if bundles else None):
            print(f"  {line}")
        if exit_after:
            shutdown.set()
        await shutdown.wait()  # the daemon drains and returns; then the nursery closes


@attrs.frozen
class Survivor:
    pid: uuid.UUID
    state: dict[str, Any]
    log_path: Path
    log_bytes: int
    heard: int


async def start_survivor(info: DaemonInfo, data_dir: Path) -> Survivor:
    """A VMM left running across the restart: its state, its log's size, what Nexus
    heard of it so far."""
    pid = uuid.uuid4()
    async with httpx.AsyncClient(
        base_url=info.api_url, timeout=30, transport=RetryOverloaded()
    ) as api:
        (await api.put(f"/vmms/{pid}", json=ensure_body_json())).raise_for_status()
        body = {"state": {"type": "running"}}
        (await api.put(f"/vmms/{pid}/state", json=body)).raise_for_status()
        nexus = info.recording_nexus
        if nexus is not None:
            await nexus.wait_for(pid, VmmState.RUNNING)
        state = (await api.get(f"/vmms/{pid}/state")).json()
    log_path = data_dir / "zones" / zone_name_for(pid) / LOG_SUBDIR / SERVICE_LOG
    size = (await trio.Path(log_path).stat()).st_size
    return Survivor(pid, state, log_path, size, len(await _heard(info, pid)))


async def check_survivor(info: DaemonInfo, survivor: Survivor) -> list[str]:
    """What the restarted agent says of the survivor, in words."""
    async with httpx.AsyncClient(
        base_url=info.api_url, timeout=30, transport=RetryOverloaded()
    ) as api:
        state = (await api.get(f"/vmms/{survivor.pid}/state")).json()
    await trio.sleep(1.0)  # the guest writes its log twice a second
    size = (await trio.Path(survivor.log_path).stat()).st_size
    heard = await _heard(info, survivor.pid)
    vmm, before = state["vmm_state"], survivor.state["vmm_state"]
    same = state == survivor.state
    return [
        f"after the restart: {vmm['state']} at generation {vmm['gen']} "
        f"({'the same as before' if same else 'was ' + str(before['state'])}); "
        f"its Propolis log grew {survivor.log_bytes} -> {size} bytes (never restarted);",
        f"Nexus was told nothing new: {len(heard) - survivor.heard} updates since the stop "
        "(omicron's sled agent forgets its zones here, and Nexus marks the instance Failed).",
    ]


async def _heard(info: DaemonInfo, pid: uuid.UUID) -> list[Any]:
    nexus = info.recording_nexus
    if isinstance(nexus, RemoteNexusView):
        return [u for u in await nexus.updates() if u["propolis_id"] == str(pid)]
    if isinstance(nexus, FakeNexus):
        return list(nexus.states_for(pid))
    return []


def _this_command() -> str:
    """How this process was started (``.venv/bin/sledagent`` under ``make demo``)."""
    argv0 = sys.argv[0]
    return shlex.quote(argv0) if Path(argv0).name == "sledagent" else "sledagent"


def paste_lines(api_url: str, bundle: DemoBundle | None) -> list[str]:
    """Complete shell commands (quoted, no placeholders) against the demo daemon."""
    lines = [f"curl -s {shlex.quote(api_url + '/zones/bundles')}"]
    if bundle is not None:
        url = f"{api_url}/zones/bundles/{bundle.zone}/{bundle.bundle_id}"
        lines.append(f"curl -s -o bundle.tar.gz {shlex.quote(url)} && tar -tzvf bundle.tar.gz")
    lines += [
        f"curl -s {shlex.quote(api_url + '/zones/bundle-cleanup/utilization')}",
        f"{_this_command()} zone-bundle --url {shlex.quote(api_url)} ls",
    ]
    return lines
