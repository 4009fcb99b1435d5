"""``sledagent bench ...``: the benchmarks' commands (scripts that print figures)."""

from __future__ import annotations

import json as jsonlib
import shlex
import signal as signal_module
import sys
from pathlib import Path
from typing import Annotated, Literal

import attrs
import cyclopts
from cyclopts import validators as cv
from rich.console import Console
from rich.table import Table

from ._config import TerminationPolicy
from ._failures import UsageError
from ._flags import (
    AtLeastZero,
    Count,
    CountOrNone,
    Counts,
    NonNegative,
    NonNegativeOrNone,
    NonNegatives,
    PathFlag,
    Positive,
    Positives,
)
from ._log import configure_logging
from .bench._api import run_api_bench
from .bench._bundle import BundleBenchParams, run_bundle_bench
from .bench._crash import CrashParams, run_crash_point
from .bench._crash import leaks as crash_leaks
from .bench._crash_mixed import MixedParams, mixed_leaks, run_mixed_point
from .bench._faults import FaultParams, nexus_outage, propolis_faults
from .bench._faults import problems as fault_problems
from .bench._load import LoadParams, run_load_bench
from .bench._load import problems as load_problems
from .bench._mass_stop import MassStopParams, run_mass_stop
from .bench._migrate import run_migrate_bench
from .bench._restart import run_restart_bench
from .bench._restart import targets as restart_targets
from .bench._scale import run_scale_bench
from .bench._sweep import SweepParams, run_sweep
from .bench._wire import POLICY_MODES, WireParams, run_wire_bench

#: ``--vmms 10 50 200``: a list option takes every value that follows it.
Many = cyclopts.Parameter(consume_multiple=True)


def _signal_name(hint: object, value: str) -> None:
    if value not in signal_module.Signals.__members__:
        raise ValueError("Expected a signal name such as SIGKILL or SIGTERM")


bench = cyclopts.App(name="bench", help="Benchmarks: print figures as JSON and a table.")


def command_line() -> str:
    return "sledagent " + shlex.join(sys.argv[1:])


def policy_table(report: dict[str, object], title: str) -> Table:
    table = Table(title=title)
    table.add_column("figure")
    policies: dict[str, dict[str, object]] = dict(report["policies"])  # type: ignore[call-overload]
    for baseline in ("floor", "no_reads"):  # over HTTP: the runs they are compared to
        if report.get(baseline):
            policies[baseline] = report[baseline]  # type: ignore[assignment]
    for name in policies:
        table.add_column(name, justify="right")

    def row(label: str, pick: object) -> None:
        table.add_row(label, *(str(pick(p)) for p in policies.values()))  # type: ignore[operator]

    row("halt->publish p50 (s)", lambda p: p["halt_to_publish_s"]["p50"])
    row("halt->publish p99 (s)", lambda p: p["halt_to_publish_s"]["p99"])
    row("halt->publish max (s)", lambda p: p["halt_to_publish_s"]["max"])
    row("GET state p99 (s)", lambda p: p["get_state_s"]["p99"])
    row("GET state timeouts", lambda p: p["get_state_s"]["timeouts"])
    if any("refused" in p["get_state_s"] for p in policies.values()):  # type: ignore[operator]
        row("GET state reads", lambda p: p["get_state_s"]["reads"])
        row("  of them 503 (shed)", lambda p: p["get_state_s"].get("refused"))
        row("  503 p99 (s)", lambda p: p["get_state_s"].get("refused_p99"))
    row("zone held p99 (s)", lambda p: p["zone_held_s"]["p99"])
    row("drain (s)", lambda p: p["drain_s"])
    row("bundles", lambda p: p["bundles"])
    row("peak RSS (MiB)", lambda p: p["peak_rss_mb"])
    return table


@bench.command(name="mass-stop")
async def mass_stop(
    *,
    policy: Literal["reaper", "inline", "both"] = "both",
    vmms: Count = 200,
    command_s: NonNegative = 0.1,
    copy_s: NonNegative = 0.1,
    nexus_latency_s: NonNegative = 0.002,
    get_timeout_s: Positive = 10.0,
    backend: Literal["fake", "local"] = "fake",
    log_mb: NonNegative = 1.0,
    wire: Literal["memory", "http"] = "memory",
    reads_per_s: NonNegativeOrNone = None,
    api_front: Literal["process", "agent"] = "process",
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
        With ``--backend local`` or ``--wire http``: MB of logs per zone.
    wire
        ``memory``: the agent in process with fake peers. ``http``: the daemon on the
        embedded default, over loopback HTTP (local zones, real bundles, simulated
        Propolis, recording Nexus): the policy's runs (``both``: reaper, inline,
        inline_omicron), a floor without logs or bundling and, for the reaper, the same
        halts with no reader (``no_reads``).
    reads_per_s
        With ``--wire http``: state reads offered per second in all, spread over the
        VMMs (0: none). Default: each VMM every 0.5 s (2 x N per second).
    api_front
        With ``--wire http``: who answers state reads: ``process`` (the daemon's
        default, ``[http] front_process``) or ``agent`` (the agent's own thread).
    json
        Print only the JSON report.
    """
    configure_logging(json=True, level="error")
    if reads_per_s is not None and (reads_per_s < 0 or wire != "http"):
        raise UsageError("--reads-per-s: >= 0, and only with --wire http")
    if wire == "http":
        wparams = WireParams(
            vmms=vmms,
            log_mb=log_mb,
            get_timeout_s=get_timeout_s,
            reads_per_s=reads_per_s,
            api_front=api_front,
        )
        wreport = {
            "command": command_line(),
            **(await run_wire_bench(wparams, POLICY_MODES[policy])),
        }
        print(jsonlib.dumps(wreport, indent=None if json else 2))
        if not json:
            Console(stderr=True).print(policy_table(wreport, f"over HTTP: {wreport['command']}"))
        return 0
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
    report = {"command": command_line(), **(await run_mass_stop(policies, params))}
    print(jsonlib.dumps(report, indent=None if json else 2))
    if not json:
        console = Console(stderr=True)
        console.print(policy_table(report, f"mass stop of {vmms} VMMs: {report['command']}"))
        if "ratios" in report:
            console.print(f"inline / reaper, halt->publish p99: {report['ratios']}")
    return 0


@bench.command(name="bundle")
async def bundle(
    *,
    zones: Count = 8,
    log_mb: NonNegative = 10.0,
    level: Annotated[int, cyclopts.Parameter(validator=cv.Number(gte=0, lte=9))] = 2,
    archive_concurrency: CountOrNone = None,
    archive_in: Literal["process", "thread"] = "process",
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
    archive_in
        Compress in worker ``process``es (the daemon's default) or ``thread``s.
    json
        Print only the JSON report.
    """
    configure_logging(json=True, level="error")
    params = BundleBenchParams(zones=zones, log_mb=log_mb, level=level, archive_in=archive_in)
    if archive_concurrency is not None:
        params = attrs.evolve(params, archive_concurrency=archive_concurrency)
    report = {"command": command_line(), **(await run_bundle_bench(params))}
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


@bench.command(name="api")
async def api_bench(
    *,
    requests: Count = 5000,
    connections: Count = 50,
    front: Literal["agent", "process"] = "agent",
) -> int:
    """Serve the API and read one VMM's state back to back from another process.

    Prints JSON: the server's CPU per request (the cost the agent's trio thread pays
    for every read), requests per second and latency.

    Parameters
    ----------
    requests
        Requests in all.
    connections
        Keep-alive connections reading at once.
    front
        ``agent``: the agent's loop answers; ``process``: the front process does
        (``[http] front_process``), its CPU per request reported apart.
    """
    configure_logging(json=True, level="error")
    report = {
        "command": command_line(),
        **(await run_api_bench(requests=requests, connections=connections, front=front)),
    }
    print(jsonlib.dumps(report))
    return 0


@bench.command(name="scale")
async def scale_bench(*, vmms: Count = 1000) -> int:
    """Run N VMMs (simulated Propolis in another process); print what each costs the
    agent's process: resident memory, file descriptors, trio tasks.

    Parameters
    ----------
    vmms
        VMMs registered and running at once.
    """
    configure_logging(json=True, level="error")
    report = {"command": command_line(), **(await run_scale_bench(vmms=vmms))}
    print(jsonlib.dumps(report))
    return 0


@bench.command(name="crash")
async def crash_bench(
    *,
    points: Count = 50,
    seed: int = 1,
    vmms: Count = 8,
    log_mb: NonNegative = 20.0,
    max_delay_s: NonNegative = 1.5,
    signal: Annotated[str, cyclopts.Parameter(validator=_signal_name)] = "SIGKILL",
    drain_s: Positive = 60.0,
    workload: Literal["mass-halt", "mixed"] = "mass-halt",
) -> int:
    """Kill -9 the daemon at seeded points of a mass stop's cleanup, restart it, and check
    that nothing leaked: no partial bundle, no snapshot, no zone; every bundle valid.
    ``--workload mixed``: registrations, runs, stops and a mass halt at once; after each
    kill and restart, no running guest lost, every terminal state delivered, generations
    never going back at Nexus (``bench/_crash_mixed.py``).

    Prints one JSON line per point, then the totals; exits 1 if any point leaked.

    Parameters
    ----------
    points
        Crash points (each a fresh daemon, data directory and sim process).
    seed
        The first point's seed; point i uses seed + i.
    vmms
        VMMs halted at once per point.
    log_mb
        MB of logs per zone (the cleanup's length, so where kills land).
    max_delay_s
        The signal comes a seeded delay in [0, this] after the halt.
    signal
        SIGKILL (a crash) or SIGTERM (a shutdown: drain, exit 0, the next start finishes).
    drain_s
        The daemon's ``shutdown_drain_s``: how long a SIGTERM lets the reaper work on.
    workload
        ``mass-halt`` (every guest halts, then the kill) or ``mixed`` (``vmms`` per group:
        running guests left alone, halts, stops and new registrations at once).
    """
    configure_logging(json=True, level="error")
    if workload == "mixed":
        return await _mixed_crash(points, seed, vmms, log_mb, max_delay_s)
    params = CrashParams(
        vmms=vmms, log_mb=log_mb, max_delay_s=max_delay_s, signal=signal, drain_s=drain_s
    )
    totals = {"points": 0, "leaky_points": 0, "vmms": 0, "terminal_states_delivered": 0,
              "bundles": 0}  # fmt: skip
    for i in range(points):
        result = await run_crash_point(seed + i, params)
        found = crash_leaks(result)
        print(jsonlib.dumps({**result, "leaks": found}), flush=True)
        totals["points"] += 1
        totals["leaky_points"] += bool(found)
        totals["vmms"] += vmms
        totals["terminal_states_delivered"] += int(str(result["terminal_states_delivered"]))
        totals["bundles"] += int(str(result["bundles"]))
    print(jsonlib.dumps({"command": command_line(), "totals": totals}))
    return 1 if totals["leaky_points"] else 0


async def _mixed_crash(
    points: int, seed: int, per_group: int, log_mb: float, max_delay_s: float
) -> int:
    params = MixedParams(per_group=per_group, log_mb=log_mb, max_delay_s=max_delay_s)
    totals = {"points": 0, "leaky_points": 0, "vmms": 0, "running_guests_lost": 0,
              "terminal_states_lost": 0, "registrations_lost": 0, "generation_regressions": 0,
              "generation_repeats": 0, "bundles": 0}  # fmt: skip
    for i in range(points):
        result = await run_mixed_point(seed + i, params)
        found = mixed_leaks(result)
        print(jsonlib.dumps({**result, "leaks": found}), flush=True)
        totals["points"] += 1
        totals["leaky_points"] += bool(found)
        totals["vmms"] += int(str(result["vmms"]))
        for key in ("running_guests_lost", "registrations_lost", "generation_regressions"):
            totals[key] += len(result[key])  # type: ignore[arg-type]
        for key in ("terminal_states_lost", "generation_repeats", "bundles"):
            totals[key] += int(str(result[key]))
    print(jsonlib.dumps({"command": command_line(), "totals": totals}))
    return 1 if totals["leaky_points"] else 0


@bench.command(name="restart")
async def restart_bench(*, vmms: Count = 1000, reads_per_s: NonNegative = 400.0) -> int:
    """Kill -9 the daemon with VMMS running VMMs and start it again: time to the first
    answered read and to every VMM re-adopted, reads meanwhile, ``failed`` published;
    beside the same start with an empty journal (the floor). Prints each target (issue
    18: all re-adopted, none failed, within 5 s, reads p99 <= 100 ms, no timeouts) met or
    not; exits 1 if one is missed.

    Parameters
    ----------
    vmms
        Running VMMs at the kill (each with its simulated Propolis in the sim process).
    reads_per_s
        ``GET /vmms/{id}/state`` per second over all VMMs while the daemon restarts.
    """
    configure_logging(json=True, level="error")
    result = await run_restart_bench(vmms=vmms, reads_per_s=reads_per_s)
    met = restart_targets(result)
    print(jsonlib.dumps({"command": command_line(), **result, "targets": met}))
    return 0 if all(met.values()) else 1


@bench.command(name="migrate")
async def migrate_bench(*, vmms: Count = 100, log_mb: NonNegative = 1.0) -> int:
    """VMMS live migrations at once from sled A to sled B (two daemons, one recording
    Nexus) while A reaps the sources' zones: p50/p99 from the target's registration to
    ``completed`` at Nexus from both sides, beside the same registrations with no
    migration (the floor). Exits 1 if a migration did not complete or Nexus found the
    protocol broken.

    Parameters
    ----------
    vmms
        Migrations at once (VMMs running on sled A).
    log_mb
        MB of logs seeded in each zone (what A bundles when it reaps a source).
    """
    configure_logging(json=True, level="error")
    result = await run_migrate_bench(vmms=vmms, log_mb=log_mb)
    print(jsonlib.dumps({"command": command_line(), **result}), flush=True)
    outcomes: dict[str, int] = result["outcomes"]  # type: ignore[assignment]
    return 1 if result["problems"] or outcomes.get("completed", 0) != vmms else 0


@bench.command(name="faults")
async def faults_bench(
    *,
    vmms: Count = 50,
    down_s: Positive = 30.0,
    modes: Annotated[tuple[Literal["down", "503", "slow"], ...], Many] = ("down", "503", "slow"),
    propolis: bool = True,
    nexus_backoff_max_s: Positive = 180.0,
) -> int:
    """Nexus down, answering 503 or slow, and Propolis faults, against the daemon as a
    process: every terminal state delivered, the API answering, every zone reaped.

    Prints one JSON line per scenario with the problems found; exits 1 if any.

    Parameters
    ----------
    vmms
        VMMs halted as the Nexus fault starts.
    down_s
        How long Nexus stays down, failing or slow.
    modes
        Nexus faults to run: down (connections refused), 503, slow.
    propolis
        Also run the Propolis faults (vanish, fail, drop, die, hung monitor + stop).
    nexus_backoff_max_s
        The daemon's Nexus retry cap (omicron's: 180 s).
    """
    configure_logging(json=True, level="error")
    failed = 0
    runs = [FaultParams(vmms=vmms, down_s=down_s, mode=m, nexus_backoff_max_s=nexus_backoff_max_s)
            for m in modes]  # fmt: skip
    for params in runs:
        result = await nexus_outage(params)
        found = fault_problems(result)
        failed += bool(found)
        print(jsonlib.dumps({"command": command_line(), **result, "problems": found}), flush=True)
    if propolis:
        result = await propolis_faults(FaultParams())
        found = fault_problems(result)
        failed += bool(found)
        print(jsonlib.dumps({"command": command_line(), **result, "problems": found}), flush=True)
    return 1 if failed else 0


@bench.command(name="load")
async def load_bench(
    *,
    vmms: Count = 1000,
    halting: AtLeastZero = 200,
    concurrency: Count = 1000,
    min_waves: Count = 3,
    log_mb: NonNegative = 1.0,
) -> int:
    """Waves of concurrent GET/PUT state requests while VMMs tear down: every request
    answered (its state, or 503 INSTANCE_CHANNEL_FULL, or a terminal-VMM error), none
    dropped; prints the latencies. Exits 1 if any request was dropped.

    Parameters
    ----------
    vmms
        VMMs registered and running.
    halting
        Of them, how many power off at once as the load starts.
    concurrency
        Requests in flight at once per wave (half GET, half PUT running).
    min_waves
        Waves at least; more until the reaper is idle.
    log_mb
        MB of logs per zone (what each bundle archives).
    """
    configure_logging(json=True, level="error")
    params = LoadParams(
        vmms=vmms, halting=halting, concurrency=concurrency, min_waves=min_waves, log_mb=log_mb
    )
    result = await run_load_bench(params)
    found = load_problems(result)
    print(jsonlib.dumps({"command": command_line(), **result, "problems": found}), flush=True)
    return 1 if found else 0


@bench.command(name="sweep")
async def sweep_bench(
    *,
    vmms: Counts = (10, 50, 200, 1000),
    log_mb: Positives = (1.0, 10.0, 50.0),
    read_rates: NonNegatives = (0.0, 400.0, 2000.0),
    inline_max_mb: NonNegative = 2000.0,
    omicron_max_mb: NonNegative = 500.0,
    out_dir: PathFlag = Path("docs/bench/sweep"),
) -> int:
    """Mass stop over the wire at every N x log volume x offered read rate (reaper,
    floor; the inline policies where they fit), the bundling rate per phase-2 slot
    count; writes ``sweep.json`` and PNG plots into ``out_dir``.

    Parameters
    ----------
    vmms
        The N values (VMMs stopped at once).
    log_mb
        MB of logs per VMM.
    read_rates
        State reads offered per second in all (0: none); the inline policies run at
        400 only (or the highest rate given).
    inline_max_mb
        Run the inline policy (one bundle at a time) only up to this much log in all.
    omicron_max_mb
        Run the inline policy with gzip -9 only up to this much log in all.
    out_dir
        Where the JSON and plots go.
    """
    configure_logging(json=True, level="error")
    params = SweepParams(
        vmms=vmms,
        log_mb=log_mb,
        read_rates=read_rates,
        inline_max_mb=inline_max_mb,
        omicron_max_mb=omicron_max_mb,
    )
    report = await run_sweep(params, out_dir, progress=lambda line: print(line, flush=True))
    print(jsonlib.dumps({"command": command_line(), "out_dir": str(out_dir)}))
    print(jsonlib.dumps(report["points"]))
    return 0
