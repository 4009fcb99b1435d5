"""The ``sledagent`` command line (cyclopts, trio backend)."""

from __future__ import annotations

import json as jsonlib
import shlex
import signal
import sys
from pathlib import Path
from typing import Annotated, Literal

import attrs
import cyclopts
import trio
from rich.console import Console
from rich.table import Table

from ._config import TerminationPolicy
from ._daemon import ConfigError, DaemonConfig, load_config, run_daemon
from ._demo import run_local_demo
from ._log import configure_logging
from .bench._bundle import BundleBenchParams, run_bundle_bench
from .bench._mass_stop import MassStopParams, run_mass_stop

app = cyclopts.App(
    name="sledagent",
    help=(
        "A host agent that runs the lifecycle of the VMs on one sled and collects their "
        "diagnostics. It publishes a VMM's halt to Nexus at once and hands the VMM's zone "
        "to a reaper that bundles and tears it down apart from the VMM's runner."
    ),
    backend="trio",
)
bench = cyclopts.App(name="bench", help="Benchmarks: print figures as JSON and a table.")
app.command(bench)


def _command_line() -> str:
    return "sledagent " + shlex.join(sys.argv[1:])


def _policy_table(report: dict[str, object], title: str) -> Table:
    table = Table(title=title)
    table.add_column("figure")
    policies: dict[str, dict[str, object]] = report["policies"]  # type: ignore[assignment]
    for name in policies:
        table.add_column(name, justify="right")

    def row(label: str, pick: object) -> None:
        table.add_row(label, *(str(pick(p)) for p in policies.values()))  # type: ignore[operator]

    row("halt->publish p50 (s)", lambda p: p["halt_to_publish_s"]["p50"])
    row("halt->publish p99 (s)", lambda p: p["halt_to_publish_s"]["p99"])
    row("halt->publish max (s)", lambda p: p["halt_to_publish_s"]["max"])
    row("GET state p99 (s)", lambda p: p["get_state_s"]["p99"])
    row("GET state timeouts", lambda p: p["get_state_s"]["timeouts"])
    row("zone held p99 (s)", lambda p: p["zone_held_s"]["p99"])
    row("drain (s)", lambda p: p["drain_s"])
    row("bundles", lambda p: p["bundles"])
    row("peak RSS (MiB)", lambda p: p["peak_rss_mb"])
    return table


@bench.command(name="mass-stop")
async def mass_stop(
    *,
    policy: Literal["reaper", "inline", "both"] = "both",
    vmms: int = 200,
    command_s: float = 0.1,
    copy_s: float = 0.1,
    nexus_latency_s: float = 0.002,
    get_timeout_s: float = 10.0,
    backend: Literal["fake", "local"] = "fake",
    log_mb: float = 1.0,
    json: Annotated[bool, cyclopts.Parameter(negative="")] = False,
) -> int:
    """Halt N VMMs at once and measure how long until Nexus is told, per policy.

    Runs on the in-process fake host (zones, Propolis and Nexus), in real time. Bundle
    work is simulated: ``--command-s`` while the zone is held, ``--copy-s`` after.

    Parameters
    ----------
    policy
        ``reaper`` (ours), ``inline`` (omicron's behaviour, the baseline) or ``both``.
    vmms
        Number of VMMs halting at once.
    command_s
        Simulated duration of the zone commands of one bundle (phase 1).
    copy_s
        Simulated duration of writing one archive (phase 2).
    nexus_latency_s
        Simulated latency of each request to Nexus.
    get_timeout_s
        Client timeout of each GET state issued while zones are reaped.
    backend
        ``fake`` (simulated bundle work) or ``local`` (real zones, real tar.gz bundles).
    log_mb
        With ``--backend local``: MB of logs per zone.
    json
        Print only the JSON report.
    """
    configure_logging(json=True, level="error")
    params = MassStopParams(
        vmms=vmms,
        command_s=command_s,
        copy_s=copy_s,
        nexus_latency_s=nexus_latency_s,
        get_timeout_s=get_timeout_s,
        backend=backend,
        log_mb=log_mb,
    )
    policies = (
        [TerminationPolicy.REAPER, TerminationPolicy.INLINE]
        if policy == "both"
        else [TerminationPolicy(policy)]
    )
    report = {"command": _command_line(), **(await run_mass_stop(policies, params))}
    print(jsonlib.dumps(report, indent=None if json else 2))
    if not json:
        console = Console(stderr=True)
        console.print(_policy_table(report, f"mass stop of {vmms} VMMs: {report['command']}"))
        if "ratios" in report:
            console.print(f"inline / reaper, halt->publish p99: {report['ratios']}")
    return 0


@bench.command(name="bundle")
async def bundle(
    *,
    zones: int = 8,
    log_mb: float = 10.0,
    level: int = 2,
    archive_concurrency: int | None = None,
    json: Annotated[bool, cyclopts.Parameter(negative="")] = False,
) -> int:
    """Bundle Z local zones with M MB of logs each; compare with pigz -1 and gzip -9.

    Parameters
    ----------
    zones
        Number of zones bundled at once.
    log_mb
        MB of realistic JSON logs per zone (live, rotated and archived files).
    level
        isal compression level of our bundles (0..3).
    archive_concurrency
        Phase-2 slots (default: the number of cores).
    json
        Print only the JSON report.
    """
    configure_logging(json=True, level="error")
    params = BundleBenchParams(zones=zones, log_mb=log_mb, level=level)
    if archive_concurrency is not None:
        params = attrs.evolve(params, archive_concurrency=archive_concurrency)
    report = {"command": _command_line(), **(await run_bundle_bench(params))}
    print(jsonlib.dumps(report, indent=None if json else 2))
    if not json:
        table = Table(title=f"bundles: {report['command']}")
        for col in ("method", "MB/s", "seconds", "output/input"):
            table.add_column(col, justify="right")
        for key in ("ours", "pigz_1", "gzip9_serial"):
            r = report.get(key)
            if isinstance(r, dict):
                table.add_row(key, str(r["mb_per_s"]), str(r["seconds"]), str(r["ratio"]))
        console = Console(stderr=True)
        console.print(table)
        console.print(f"ratios: {report.get('ratios')}; zone held: {report['ours']['zone_held_s']}")  # type: ignore[index]
    return 0


@app.command
async def demo(
    *, vmms: int = 10, bundle_s: float = 1.0, data_dir: Path = Path("demo-data"), log_mb: float = 2
) -> int:
    """Show the agent at work, in two parts.

    1. On the in-process fake host, ``vmms`` VMMs halt at once under both policies, side
       by side; each bundle takes ``bundle_s`` seconds. Under the reaper every halt
       reaches Nexus at once; under the inline baseline (omicron's behaviour) each waits
       for the bundles ahead of it.
    2. On real local zones under ``data_dir`` (a process writing logs in each, ``log_mb``
       MB of seeded logs), five VMMs start and stop; the reaper writes real tar.gz
       bundles, listed at the end. (Propolis and Nexus are in-process fakes until the
       HTTP daemon lands.)

    Parameters
    ----------
    vmms
        Number of VMMs to halt at once in part 1.
    bundle_s
        Simulated duration of one bundle in part 1.
    data_dir
        Where part 2 keeps its zones and bundles.
    log_mb
        MB of logs per zone in part 2.
    """
    configure_logging(json=False, level="error")
    console = Console()
    params = MassStopParams(vmms=vmms, command_s=bundle_s / 2, copy_s=bundle_s / 2)
    console.print(
        f"[bold]1.[/] {vmms} VMMs on the fake host halt at once, bundles of {bundle_s:g} s "
        "each; first with the reaper, then inline (omicron)..."
    )
    report = await run_mass_stop([TerminationPolicy.REAPER, TerminationPolicy.INLINE], params)
    console.print(_policy_table(report, f"{vmms} VMMs halting at once"))
    console.print(f"inline / reaper, halt->publish p99: {report.get('ratios')}")
    console.print(
        "reaper: each halt reaches Nexus at once and reads never wait; zones are bundled "
        "and torn down behind it.\ninline (omicron): each halt waits for its own bundle, "
        "and every bundle waits for the host-wide lock, so reads time out.\n"
    )
    console.print(f"[bold]2.[/] Five VMMs on real local zones under {data_dir}/ ...")
    bundles = await run_local_demo(Path(await trio.Path(data_dir).resolve()), vmms=5, log_mb=log_mb)
    table = Table(title=f"bundles written under {data_dir}/")
    for col in ("VMM (zone oxz_propolis-server_...)", "cause", "KiB", "entries"):
        table.add_column(col)
    for b in bundles:
        table.add_row(b.zone.removeprefix("oxz_propolis-server_")[:13] + "...", b.cause,
                      f"{b.size / 1024:.0f}", str(b.entries))  # fmt: skip
    console.print(table)
    for b in bundles:
        console.print(f"  {b.path}", soft_wrap=True)
    console.print("Open one with: tar -tzvf <file>")
    return 0


@app.command
async def run(
    *,
    config: Path | None = None,
    listen: str | None = None,
    data_dir: Path | None = None,
    nexus: str | None = None,
) -> int:
    """Run the agent daemon until SIGINT/SIGTERM.

    With no ``--nexus``, a recording Nexus runs in this process (the embedded default);
    zones are local, each with a simulated Propolis. On a signal the API stops, the
    reaper drains within ``shutdown_drain_s`` and the process exits 0; what is left is
    picked up by the next start.

    Parameters
    ----------
    config
        TOML file (docs/operations.md lists every key); flags override it.
    listen
        Address of the API (default 127.0.0.1:12345; port 0 picks a free one).
    data_dir
        Where zones, snapshots, bundles and the cleanup context live.
    nexus
        Base URL of Nexus's internal API.
    """
    configure_logging()
    try:
        cfg = load_config(config) if config is not None else DaemonConfig()
    except ConfigError as exc:
        print(f"sledagent: {exc}", file=sys.stderr)
        return 2
    overrides: dict[str, object] = {}
    if listen is not None:
        overrides["listen"] = listen
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    if nexus is not None:
        overrides["nexus_url"] = nexus
    cfg = attrs.evolve(cfg, **overrides)  # type: ignore[arg-type]
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:

        async def on_signals() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    shutdown.set()
                    return

        nursery.start_soon(on_signals)
        info = await nursery.start(run_daemon, cfg, shutdown)
        print(f"sledagent listening on {info.api_url} (Nexus: {info.nexus_url})", flush=True)
        await shutdown.wait()
    return 0


def main() -> None:
    app(result_action="sys_exit")
