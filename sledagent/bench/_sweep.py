"""``sledagent bench sweep``: the mass stop over N VMMs x log volume x read rate, with plots.

Each point is one ``mass-stop --wire http`` run (``_wire.run_wire``: the daemon with
local zones, real logs and real bundles; simulated Propolis and Nexus in a process of
their own; state readers in another) at one offered read rate (``read_rates``: state
reads per second in all, spread over the N VMMs; 0: no reader): the ``reaper`` policy at
every point; ``inline`` (omicron's policy, our archiver) and ``inline_omicron`` (its
policy and its gzip -9) at the reference rate only (``inline_read_rate``), where their
serialized bundling fits the time budget (``inline_max_mb``, ``omicron_max_mb`` of logs
in all); the ``floor`` (no logs, no bundling) once per N and rate.

Two bundle-only runs (``bench bundle``) give bundling MB/s against the phase-2 limiter
size, and the rate with every slot busy that the drain-time model divides by: a mass
stop should drain in about (total log bytes / that rate).

Writes ``sweep.json`` and seven PNG plots into ``out_dir``: five against N and volume
at the reference rate, two against the read rate (halt-to-publish; reads' p99 and the
share refused).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import attrs
import trio

from .._failures import UsageError
from ._bundle import BundleBenchParams, run_bundle_bench
from ._wire import WireParams, run_wire


@attrs.frozen(kw_only=True)
class SweepParams:
    vmms: tuple[int, ...] = (10, 50, 200, 1000)
    log_mb: tuple[float, ...] = (1.0, 10.0, 50.0)
    #: The inline policies bundle one zone at a time: run them only up to this many MB
    #: of logs in all (our archiver) and ``omicron_max_mb`` (gzip -9, ~20 MB/s).
    inline_max_mb: float = 2000.0
    omicron_max_mb: float = 500.0
    #: Phase-2 limiter sizes for the bundling-rate curve (8 zones x ``rate_log_mb``).
    archive_slots: tuple[int, ...] = (1, 2, 4)
    rate_log_mb: float = 50.0
    #: State reads offered per second in all (each VMM every N / rate seconds); 0: none.
    read_rates: tuple[float, ...] = (0.0, 400.0, 2000.0)
    #: The rate of the plots against N and volume, and of the inline policies' runs.
    inline_read_rate: float = 400.0

    def __attrs_post_init__(self) -> None:
        if not self.vmms or min(self.vmms) < 1:
            raise UsageError("vmms: at least one N, each >= 1")
        if not self.log_mb or min(self.log_mb) <= 0:
            raise UsageError("log_mb: at least one volume, each > 0")
        if not self.archive_slots or min(self.archive_slots) < 1:
            raise UsageError("archive_slots: each >= 1")
        if not self.read_rates or min(self.read_rates) < 0:
            raise UsageError("read_rates: at least one rate, each >= 0 (0: no reads)")

    @property
    def reference_rate(self) -> float:
        """The rate of the plots against N and volume: ``inline_read_rate`` if swept."""
        rates = sorted(self.read_rates)
        return self.inline_read_rate if self.inline_read_rate in rates else rates[-1]


def _policy_figures(r: dict[str, Any]) -> dict[str, Any]:
    g = r["get_state_s"]
    return {
        "halt_to_publish_p99_s": r["halt_to_publish_s"]["p99"],
        "halt_to_publish_p50_s": r["halt_to_publish_s"]["p50"],
        "get_state_p99_s": g["p99"],
        "get_state_timeouts": g["timeouts"],
        "get_state_reads": g["reads"],
        "get_state_refused": g["refused"],
        "get_state_refused_p99_s": g["refused_p99"],
        "zone_held_p99_s": r["zone_held_s"]["p99"],
        "drain_s": r["drain_s"],
        "bundles": r["bundles"],
        "archive": r["archive"],
    }


async def run_sweep(p: SweepParams, out_dir: Path, progress: Any = print) -> dict[str, Any]:
    await trio.Path(out_dir).mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    rates = {}
    for slots in sorted({*p.archive_slots, cores}):
        params = BundleBenchParams(
            zones=8, log_mb=p.rate_log_mb, archive_concurrency=slots, baselines=False
        )
        r = await run_bundle_bench(params)
        rates[slots] = r["ours"]["mb_per_s"]  # type: ignore[index]
        progress(f"bundle rate, {slots} phase-2 slots: {rates[slots]} MB/s")
    all_busy = rates[cores]
    points = []
    with tempfile.TemporaryDirectory(prefix="sledagent-seed-") as cache:
        for n in p.vmms:
            for rate in sorted(p.read_rates):
                wire = WireParams(vmms=n, log_mb=0.0, reads_per_s=rate)
                floor = _policy_figures(await run_wire("floor", wire, Path(cache)))
                progress(f"N={n} {rate:g} reads/s floor: {floor}")
                for mb in p.log_mb:
                    point = await _point(p, n, mb, rate, floor, all_busy, Path(cache), progress)
                    points.append(point)
    report = {
        "params": attrs.asdict(p),
        "cores": cores,
        "bundle_mb_per_s_by_slots": {str(k): v for k, v in rates.items()},
        "bundle_mb_per_s_all_slots_busy": all_busy,
        "points": points,
    }
    await trio.Path(out_dir / "sweep.json").write_text(json.dumps(report, indent=1) + "\n")
    await trio.to_thread.run_sync(plot_sweep, report, out_dir)
    return report


async def _point(
    p: SweepParams,
    n: int,
    mb: float,
    rate: float,
    floor: dict[str, Any],
    all_busy: float,
    cache: Path,
    progress: Any,
) -> dict[str, Any]:
    """One N x volume x read rate: the reaper, and the inline policies where they run."""
    wire = WireParams(vmms=n, log_mb=mb, reads_per_s=rate)
    point: dict[str, Any] = {
        "vmms": n, "log_mb": mb, "total_mb": n * mb, "reads_per_s": rate, "floor": floor,
    }  # fmt: skip
    modes = ["reaper"]
    if rate == p.reference_rate and n * mb <= p.inline_max_mb:
        modes.append("inline")
    if rate == p.reference_rate and n * mb <= p.omicron_max_mb:
        modes.append("inline_omicron")
    for mode in modes:
        point[mode] = _policy_figures(await run_wire(mode, wire, cache))
        progress(f"N={n} {mb:g} MB {rate:g} reads/s {mode}: {point[mode]}")
    reaper = point["reaper"]
    point["reaper_p99_over_floor_p99_plus_50ms"] = round(
        reaper["halt_to_publish_p99_s"] / (floor["halt_to_publish_p99_s"] + 0.05), 3
    )
    predicted = n * mb / all_busy
    point["drain_predicted_s"] = round(predicted, 2)
    point["drain_over_predicted"] = round(reaper["drain_s"] / predicted, 2)
    # The same model with the rate phase 2 achieved in this run (the cores also serve
    # the reads, the peers and the teardown here).
    in_run = reaper["archive"]["mb_per_s_in_run"]
    if in_run:
        point["drain_predicted_in_run_s"] = round(n * mb / in_run, 2)
        point["drain_over_predicted_in_run"] = round(reaper["drain_s"] / (n * mb / in_run), 2)
    for mode in ("inline", "inline_omicron"):
        if mode in point:
            point[f"{mode}_over_reaper_p99"] = round(
                point[mode]["halt_to_publish_p99_s"] / reaper["halt_to_publish_p99_s"], 1
            )
    return point


def _at_reference_rate(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The points of the plots against N and volume (reports from before the read-rate
    axis have no ``reads_per_s``: all of their points)."""
    points: list[dict[str, Any]] = report["points"]
    rates = sorted({pt.get("reads_per_s") for pt in points}, key=lambda r: r or 0)
    if len(rates) <= 1:
        return points
    ref = report.get("params", {}).get("inline_read_rate", 400.0)
    ref = ref if ref in rates else rates[-1]
    return [pt for pt in points if pt.get("reads_per_s") == ref]


def _refused_share(figures: dict[str, Any]) -> float:
    refused, reads = figures.get("get_state_refused", 0), figures.get("get_state_reads", 0)
    return float(refused) / max(1.0, float(reads))


def plot_sweep(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """Seven PNGs from a sweep report (blocking: matplotlib, in a worker thread)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    everything = report["points"]
    points = _at_reference_rate(report)
    volumes = sorted({pt["log_mb"] for pt in points})
    ns = sorted({pt["vmms"] for pt in points})
    written = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    def positive(pairs: list[tuple[float, float]]) -> tuple[list[float], list[float]]:
        """Log axes: a run with no sample (p99 0) is left out of the line."""
        kept = [(x, y) for x, y in pairs if y > 0]
        return [x for x, _ in kept], [y for _, y in kept]

    def by_n(metric: str, title: str, name: str) -> None:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for mode, style in (("reaper", "-o"), ("inline", "--s"), ("inline_omicron", ":^")):
            for mb in volumes:
                run = [pt for pt in points if pt["log_mb"] == mb and mode in pt]
                xs, ys = positive([(pt["vmms"], pt[mode][metric]) for pt in run])
                if xs:
                    ax.plot(xs, ys, style, label=f"{mode}, {mb:g} MB/VMM")
        xs, ys = positive([(pt["vmms"], pt["floor"][metric]) for pt in points])
        if xs:
            ax.plot(xs, ys, "-k", lw=2, label="floor (no logs, no bundles)")
        if not ax.get_lines():
            ax.text(0.5, 0.5, "no samples", ha="center", transform=ax.transAxes)
            save(fig, name)
            return
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("VMMs stopped at once (N)")
        ax.set_ylabel("seconds")
        ax.set_title(title)
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
        save(fig, name)

    by_n("halt_to_publish_p99_s", "Halt to publish at Nexus, p99", "halt-to-publish-p99.png")
    by_n("get_state_p99_s", "GET /vmms/{id}/state during the stop, p99", "get-state-p99.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    total, drains = positive([(pt["total_mb"] / 1024, pt["reaper"]["drain_s"]) for pt in points])
    ax.plot(total, drains, "o", label="reaper: measured")
    rate = report["bundle_mb_per_s_all_slots_busy"]
    line = sorted(pt["total_mb"] / 1024 for pt in points)
    ax.plot(line, [g * 1024 / rate for g in line], "-k", label=f"bytes / {rate} MB/s")
    ax.plot(line, [1.3 * g * 1024 / rate for g in line], ":k", label="1.3x that")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("total log volume (GiB)")
    ax.set_ylabel("drain: halt to reaper idle (s)")
    ax.set_title("Drain time against the bundling rate")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    save(fig, "drain-vs-volume.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for n in ns:
        xs = [pt["log_mb"] for pt in points if pt["vmms"] == n]
        ax.plot(xs, [pt["reaper"]["zone_held_p99_s"] for pt in points if pt["vmms"] == n],
                "-o", label=f"N={n}")  # fmt: skip
    ax.axhline(2.0, color="k", ls=":", label="target 2 s")
    ax.set_xlabel("log volume per VMM (MB)")
    ax.set_ylabel("zone held by its bundle, p99 (s)")
    ax.set_title("Zone held (commands + snapshot) against log volume")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    save(fig, "zone-held-p99.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    slots = report["bundle_mb_per_s_by_slots"]
    ax.plot([int(s) for s in slots], list(slots.values()), "-o")
    ax.set_xlabel("phase-2 slots (bundle_archive_concurrency)")
    ax.set_ylabel("bundling MB/s of logs")
    ax.set_title(f"Bundling rate against the phase-2 limiter ({report['cores']} cores)")
    ax.grid(True, alpha=0.3)
    save(fig, "bundle-rate-vs-slots.png")

    # Against the offered read rate: what reads cost publishing, and how reads fared.
    rates = sorted({pt.get("reads_per_s", 0.0) for pt in everything})
    series = sorted({(pt["vmms"], pt["log_mb"]) for pt in everything})
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for n, mb in series:
        run = sorted(
            (pt.get("reads_per_s", 0.0), pt) for pt in everything
            if (pt["vmms"], pt["log_mb"]) == (n, mb)
        )  # fmt: skip
        xs, ys = [r for r, _ in run], [pt["reaper"]["halt_to_publish_p99_s"] for _, pt in run]
        line = ax.plot(xs, ys, "-o", label=f"reaper, N={n} x {mb:g} MB")
        if mb == min(m for nn, m in series if nn == n):  # one floor line per N
            ys = [pt["floor"]["halt_to_publish_p99_s"] for _, pt in run]
            ax.plot(xs, ys, ":", color=line[0].get_color(), label=f"floor, N={n}")
    ax.set_xticks(rates)
    ax.set_xlabel("state reads offered per second (in all)")
    ax.set_ylabel("halt to publish at Nexus, p99 (s)")
    ax.set_title("Publication under read load")
    ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3)
    save(fig, "halt-to-publish-vs-read-rate.png")

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.5))
    for n, mb in series:
        run = sorted(
            (pt.get("reads_per_s", 0.0), pt) for pt in everything
            if (pt["vmms"], pt["log_mb"]) == (n, mb) and pt.get("reads_per_s", 1.0) > 0
        )  # fmt: skip
        if not run:
            continue
        xs = [r for r, _ in run]
        left.plot(xs, [pt["reaper"]["get_state_p99_s"] for _, pt in run], "-o",
                  label=f"N={n} x {mb:g} MB")  # fmt: skip
        right.plot(
            xs,
            [
                pt["reaper"].get("get_state_refused", 0)
                / max(1, pt["reaper"].get("get_state_reads", 0))
                for _, pt in run
            ],
            "-o",
            label=f"N={n} x {mb:g} MB",
        )
    left.axhline(0.25, color="k", ls=":", label="bound 250 ms")
    left.set_xlabel("state reads offered per second")
    left.set_ylabel("GET state p99, answered or refused (s)")
    left.set_title("Read latency (reaper)")
    right.set_xlabel("state reads offered per second")
    right.set_ylabel("share refused with 503 + Retry-After")
    right.set_title("Reads shed (reaper)")
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    save(fig, "reads-vs-read-rate.png")
    return written
