"""``/metrics`` is an exposition Prometheus accepts: parsed by prometheus_client's own
parser always, and checked by ``promtool check metrics`` where it is installed (Debian
package ``prometheus``). Durations are histograms: cumulative buckets since start."""

from __future__ import annotations

import math
import shutil
import subprocess

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

from sledagent import VmmState
from sledagent._api import build_app
from sledagent._server import serve_api
from sledagent._stats import Histogram
from sledagent.testing import FakeHost, fast_config, open_fake_agent


async def _scrape_after_halts(n: int) -> str:
    fakes = FakeHost()
    async with open_fake_agent(fast_config(), fakes) as h, trio.open_nursery() as nursery:
        stop = trio.Event()
        binds = await nursery.start(
            lambda task_status: serve_api(
                build_app(h.agent), listen="127.0.0.1:0", shutdown=stop, task_status=task_status
            )
        )
        pids = [await h.start_vmm() for _ in range(n)]
        for pid in pids:
            fakes.propolis[pid].halt()
        for pid in pids:
            await fakes.nexus.wait_for(pid, VmmState.DESTROYED)
        await h.agent.drain()
        async with httpx.AsyncClient() as client:
            text = (await client.get(f"{binds[0]}/metrics")).text
        stop.set()
    return text


async def test_metrics_parse_as_prometheus_text_with_duration_histograms() -> None:
    with trio.fail_after(60):
        text = await _scrape_after_halts(3)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for family in families.values():
        if family.type != "summary":  # promtool: only summaries may carry "quantile"
            assert all("quantile" not in s.labels for s in family.samples), family.name
    for name in ("sledagent_halt_to_publish_seconds", "sledagent_zone_held_seconds"):
        family = families[name]
        assert family.type == "histogram", name
        buckets = [s for s in family.samples if s.name == f"{name}_bucket"]
        bounds = [float(s.labels["le"]) for s in buckets]
        counts = [s.value for s in buckets]
        assert bounds == sorted(bounds) and bounds[-1] == math.inf, name
        assert counts == sorted(counts), name  # cumulative
        count = next(s.value for s in family.samples if s.name == f"{name}_count")
        total = next(s.value for s in family.samples if s.name == f"{name}_sum")
        assert counts[-1] == count == 3 and total > 0, name  # 3 halts, 3 bundles


async def test_promtool_accepts_the_exposition() -> None:
    promtool = shutil.which("promtool")
    with trio.fail_after(60):
        text = await _scrape_after_halts(2)
        if promtool is None:  # the parse above still runs everywhere
            return
        done = await trio.run_process(
            [promtool, "check", "metrics"],
            stdin=text.encode(),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert done.returncode == 0, (done.stdout + done.stderr).decode()
    assert (done.stdout + done.stderr).strip() == b""


def test_a_histogram_counts_each_value_in_every_bucket_at_or_above_it() -> None:
    h = Histogram([0.1, 1, 10])
    for v in (0.05, 0.1, 0.5, 5, 50):
        h.observe(v)
    snap = h.snapshot()
    assert snap.buckets == ((0.1, 2), (1.0, 3), (10.0, 4), (math.inf, 5))
    assert snap.count == 5 and abs(snap.sum - 55.65) < 1e-9


def test_promtool_rejects_what_metrics_used_to_serve() -> None:
    """The check is real: a gauge with a quantile label (the old halt-to-publish) fails."""
    promtool = shutil.which("promtool")
    if promtool is None:
        return
    old = (
        "# HELP sledagent_halt_to_publish_seconds x\n"
        "# TYPE sledagent_halt_to_publish_seconds gauge\n"
        'sledagent_halt_to_publish_seconds{quantile="0.99"} 0.2\n'
    )
    done = subprocess.run(
        [promtool, "check", "metrics"], input=old.encode(), capture_output=True, timeout=60
    )
    assert done.returncode != 0
