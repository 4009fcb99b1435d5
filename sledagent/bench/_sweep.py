"""``sledagent bench sweep``: the mass stop over N VMMs x log volume, with plots.

Each point is one ``mass-stop --wire http`` run (``_wire.run_wire``: the daemon with
local zones, real logs and real bundles; simulated Propolis and Nexus in a process of
their own; state readers in another): the ``reaper`` policy at every point; ``inline``
(omicron's policy, our archiver) and ``inline_omicron`` (its policy and its gzip -9)
where their serialized bundling fits the time budget (``inline_max_mb``,
``omicron_max_mb`` of logs in all); the ``floor`` (no logs, no bundling) once per N.

Two bundle-only runs (``bench bundle``) give bundling MB/s against the phase-2 limiter
size, and the rate with every slot busy that the drain-time model divides by: a mass
stop should drain in about (total log bytes / that rate).

Writes ``sweep.json`` and five PNG plots into ``out_dir``.
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
    #: Each VMM is read every ``get_interval_s``, or less often so that the reads in all
    #: stay at ``get_total_rate`` per second (2/s per VMM up to N=200; 400/s beyond).
    get_interval_s: float = 0.5
    get_total_rate: float = 400.0

    def interval_for(self, vmms: int) -> float:
        return max(self.get_interval_s, vmms / self.get_total_rate)

    def __attrs_post_init__(self) -> None:
        if not self.vmms or min(self.vmms) < 1:
            raise UsageError("vmms: at least one N, each >= 1")
        if not self.log_mb or min(self.log_mb) <= 0:
            raise UsageError("log_mb: at least one volume, each > 0")
        if not self.archive_slots or min(self.archive_slots) < 1:
            raise UsageError("archive_slots: each >= 1")


def _policy_figures(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "halt_to_publish_p99_s": r["halt_to_publish_s"]["p99"],
        "get_state_p99_s": r["get_state_s"]["p99"],
        "get_state_timeouts": r["get_state_s"]["timeouts"],
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
            wire = WireParams(vmms=n, log_mb=0.0, get_interval_s=p.interval_for(n))
            floor = _policy_figures(await run_wire("floor", wire, Path(cache)))
            progress(f"N={n} floor: {floor}")
            for mb in p.log_mb:
                wire = WireParams(vmms=n, log_mb=mb, get_interval_s=p.interval_for(n))
                point: dict[str, Any] = {"vmms": n, "log_mb": mb, "total_mb": n * mb}
                point["floor"] = floor
                modes = ["reaper"]
                if n * mb <= p.inline_max_mb:
                    modes.append("inline")
                if n * mb <= p.omicron_max_mb:
                    modes.append("inline_omicron")
                for mode in modes:
                    point[mode] = _policy_figures(await run_wire(mode, wire, Path(cache)))
                    progress(f"N={n} {mb} MB {mode}: {point[mode]}")
                reaper = point["reaper"]
                point["reaper_p99_over_floor_p99_plus_50ms"] = round(
                    reaper["halt_to_publish_p99_s"] / (floor["halt_to_publish_p99_s"] + 0.05), 3
                )
                predicted = n * mb / all_busy
                point["drain_predicted_s"] = round(predicted, 2)
                point["drain_over_predicted"] = round(reaper["drain_s"] / predicted, 2)
                # The same model with the rate phase 2 achieved in this run (the cores
                # also serve the reads, the peers and the teardown here).
                in_run = reaper["archive"]["mb_per_s_in_run"]
                if in_run:
                    point["drain_predicted_in_run_s"] = round(n * mb / in_run, 2)
                    point["drain_over_predicted_in_run"] = round(
                        reaper["drain_s"] / (n * mb / in_run), 2
                    )
                for mode in ("inline", "inline_omicron"):
                    if mode in point:
                        point[f"{mode}_over_reaper_p99"] = round(
                            point[mode]["halt_to_publish_p99_s"] / reaper["halt_to_publish_p99_s"],
                            1,
                        )
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


def plot_sweep(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """Five PNGs from a sweep report (blocking: matplotlib, in a worker thread)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = report["points"]
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
    return written
