"""The ``sledagent`` command line (cyclopts, trio backend)."""

from __future__ import annotations

import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

import attrs
import cyclopts
import trio
from rich.console import Console

from ._bench_cli import bench, policy_table
from ._config import TerminationPolicy
from ._daemon import ConfigError, DaemonConfig, load_config, run_daemon
from ._datadir import StartupError
from ._demo import demo_config, drive_scenario
from ._journal import JournalError
from ._log import configure_logging
from ._zb_cli import zone_bundle
from .bench._mass_stop import MassStopParams, run_mass_stop
from .sim._host import run_sim_host

app = cyclopts.App(
    name="sledagent",
    help=(
        "A host agent that runs the lifecycle of the VMs on one sled and collects their "
        "diagnostics. It publishes a VMM's halt to Nexus at once and hands the VMM's zone "
        "to a reaper that bundles and tears it down apart from the VMM's runner."
    ),
    backend="trio",
)
app.command(bench)
app.command(zone_bundle)


@asynccontextmanager
async def _shutdown_on_signals(shutdown: trio.Event) -> AsyncIterator[None]:
    """Set ``shutdown`` on SIGINT/SIGTERM while the block runs."""
    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    shutdown.set()
                    return

        nursery.start_soon(watch)
        try:
            yield
        finally:
            nursery.cancel_scope.cancel()


@app.command
async def demo(
    *,
    vmms: int = 10,
    bundle_s: float = 1.0,
    data_dir: Path = Path("demo-data"),
    listen: str = "127.0.0.1:12345",
    log_mb: float = 2,
    exit_after: Annotated[bool, cyclopts.Parameter(negative="")] = False,
) -> int:
    """Show the agent at work, in two parts.

    1. On the in-process fake host, ``vmms`` VMMs halt at once under both policies, side
       by side; each bundle takes ``bundle_s`` seconds. Under the reaper every halt
       reaches Nexus at once; under the inline baseline (omicron's behaviour) each waits
       for the bundles ahead of it.
    2. The daemon starts on the embedded default (local zones under ``data_dir``, each
       with a simulated Propolis; a recording Nexus), and a short scenario is driven
       against its HTTP API as Nexus would: three VMMs are registered, run, stopped, and
       their bundles listed. The daemon then keeps running until Ctrl-C.

    Parameters
    ----------
    vmms
        Number of VMMs to halt at once in part 1.
    bundle_s
        Simulated duration of one bundle in part 1.
    data_dir
        Where the daemon keeps zones and bundles.
    listen
        Address of the daemon's API (if taken, a free port is used).
    log_mb
        MB of logs seeded in each zone of part 2.
    exit_after
        Stop the daemon after the scenario instead of waiting for Ctrl-C.
    """
    configure_logging(json=False, level="error")
    console = Console()
    params = MassStopParams(vmms=vmms, command_s=bundle_s / 2, copy_s=bundle_s / 2)
    console.print(
        f"[bold]1.[/] {vmms} VMMs on the fake host halt at once, bundles of {bundle_s:g} s "
        "each; first with the reaper, then inline (omicron)..."
    )
    report = await run_mass_stop([TerminationPolicy.REAPER, TerminationPolicy.INLINE], params)
    console.print(policy_table(report, f"{vmms} VMMs halting at once"))
    console.print(f"inline / reaper, halt->publish p99: {report.get('ratios')}")
    console.print(
        "reaper: each halt reaches Nexus at once and reads never wait; zones are bundled "
        "and torn down behind it.\ninline (omicron): each halt waits for its own bundle, "
        "and every bundle waits for the host-wide lock, so reads time out.\n"
    )
    data_dir = Path(await trio.Path(data_dir).resolve())
    shutdown = trio.Event()
    async with _shutdown_on_signals(shutdown), trio.open_nursery() as nursery:
        try:
            info = await nursery.start(run_daemon, demo_config(data_dir, listen, log_mb), shutdown)
        except OSError:  # the default port is taken: any free one will do
            info = await nursery.start(
                run_daemon, demo_config(data_dir, "127.0.0.1:0", log_mb), shutdown
            )
        console.print(f"[bold]2.[/] The daemon listens on {info.api_url}; driving three VMMs...")
        bundles = await drive_scenario(info, vmms=3)
        console.print(f"bundles of the three VMMs (files under {data_dir}/debug/):")
        for b in bundles:
            console.print(f"  {b.zone}  {b.cause}  {b.bundle_id}", soft_wrap=True)
        u = info.api_url
        console.print(
            "Talk to it (Ctrl-C to stop):\n"
            f"  curl {u}/zones/bundles\n"
            f"  curl -o b.tar.gz {u}/zones/bundles/<zone>/<bundle id> && tar -tzvf b.tar.gz\n"
            f"  curl {u}/zones/bundle-cleanup/utilization\n"
            f"  .venv/bin/sledagent --help"
        )
        if exit_after:
            shutdown.set()
        await shutdown.wait()
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
        cfg = (
            await trio.to_thread.run_sync(load_config, config)
            if config is not None
            else DaemonConfig()
        )
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
    failures: list[str] = []
    try:
        async with _shutdown_on_signals(shutdown), trio.open_nursery() as nursery:
            info = await nursery.start(run_daemon, cfg, shutdown)
            print(f"sledagent listening on {info.api_url} (Nexus: {info.nexus_url})", flush=True)
            await shutdown.wait()
    except* (StartupError, JournalError) as group:
        failures = [str(e) for e in _leaves(group)]
    for line in failures:
        print(f"sledagent: {line}", file=sys.stderr)
    return 1 if failures else 0


@app.command
async def sim(
    *,
    nexus_listen: str = "127.0.0.1:0",
    fleet_listen: str = "127.0.0.1:0",
    state_file: Path | None = None,
    idle_exit_s: float | None = None,
) -> int:
    """Run the simulated peers in this process: a recording Nexus and a Propolis fleet.

    Prints ``nexus <url>`` and ``fleet <url>``; run an agent with ``--nexus <url>`` and,
    in its config, ``propolis = "remote"`` and ``sim_fleet_url = "<url>"``. Stops on
    SIGINT/SIGTERM.

    Parameters
    ----------
    nexus_listen
        Address of the recording Nexus.
    fleet_listen
        Address of the fleet controller.
    state_file
        Write ``{"pid", "nexus_url", "fleet_url"}`` here once serving (an agent's
        embedded default finds its simulated host so; removed at exit).
    idle_exit_s
        Exit once no simulated Propolis has run and no agent renewed its lease for this
        many seconds (default: run until a signal).
    """
    configure_logging(level="warning")
    shutdown = trio.Event()
    async with _shutdown_on_signals(shutdown), trio.open_nursery() as nursery:
        nexus_url, fleet_url = await nursery.start(
            lambda task_status: run_sim_host(
                nexus_listen=nexus_listen, fleet_listen=fleet_listen,
                shutdown=shutdown, state_file=state_file, idle_exit_s=idle_exit_s,
                task_status=task_status,
            )
        )  # fmt: skip
        print(f"nexus {nexus_url}\nfleet {fleet_url}", flush=True)
    return 0


def _leaves(error: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups."""
    if isinstance(error, BaseExceptionGroup):
        return [leaf for e in error.exceptions for leaf in _leaves(e)]
    return [error]


def main() -> None:
    app(result_action="sys_exit")
