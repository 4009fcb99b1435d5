"""``sledagent bench mass-stop``: N VMMs halt at once; how long until Nexus knows?

Both termination policies run in one process, one after the other, on the fake backend
in real time (bundle work is simulated by ``command_s`` in phase 1 and ``copy_s`` in
phase 2). While the zones are reaped, every VMM is read (``GET state``) in a loop, as
Nexus and operators do, with a client timeout; reads that time out are counted.

Measured per policy:
- ``halt_to_publish_s``: from the moment Propolis reports the VMM destroyed to the
  moment Nexus has acknowledged ``destroyed`` (the figure omicron #5237 is about);
- ``get_state_s``: latency of each read while the host tears down, and ``timeouts``;
- ``zone_held_s``: how long each bundle held its zone (phase 1);
- ``drain_s``: from the halts to the last zone torn down;
- ``peak_rss_mb``: the process's peak resident memory so far.
"""

from __future__ import annotations

import random
import resource
import tempfile
import uuid
from pathlib import Path

import attrs
import trio

from .._config import AgentConfig, BackoffPolicy, TerminationPolicy
from .._errors import NoSuchVmm
from .._failures import UsageError
from .._stats import summary
from .._wire import VmmState
from ..testing import FakeHost, FakeNexus, FakeZones, LocalHost, open_fake_agent


@attrs.frozen(kw_only=True)
class MassStopParams:
    vmms: int = 200
    command_s: float = 0.1
    copy_s: float = 0.1
    nexus_latency_s: float = 0.002
    get_interval_s: float = 0.5
    get_timeout_s: float = 10.0
    archive_concurrency: int | None = None
    seed: int = 1
    #: ``fake``: bundle work simulated by command_s/copy_s. ``local``: real zones and
    #: tar.gz bundles of ``log_mb`` MB of logs per zone (Propolis and Nexus still fakes).
    backend: str = "fake"
    log_mb: float = 1.0

    def __attrs_post_init__(self) -> None:
        if self.vmms < 1:
            raise UsageError("--vmms must be >= 1")
        for name in ("command_s", "copy_s", "nexus_latency_s"):
            if getattr(self, name) < 0:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 0")
        if self.get_interval_s <= 0 or self.get_timeout_s <= 0:
            raise UsageError("--get-interval-s and --get-timeout-s must be > 0")
        if self.backend not in ("fake", "local"):
            raise UsageError("--backend must be `fake` or `local`")
        if self.log_mb < 0:
            raise UsageError("--log-mb must be >= 0")


def _peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux.
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


async def _probe_reads(
    get_state: object,
    pid: uuid.UUID,
    params: MassStopParams,
    out: list[float],
    timeouts: list[int],
    offset_s: float,
) -> None:
    """Read one VMM's state every ``get_interval_s`` until cancelled (end of drain).

    A ``NoSuchVmm`` (the VMM left the registry after Nexus acknowledged its end) is an
    answer too. Clients do not synchronize on the halt: each starts at a random offset.
    """
    await trio.sleep(offset_s)
    while True:
        t0 = trio.current_time()
        with trio.move_on_after(params.get_timeout_s) as scope:
            try:
                await get_state(pid)  # type: ignore[operator]
            except NoSuchVmm:
                pass
        if scope.cancelled_caught:
            timeouts[0] += 1
        else:
            out.append(trio.current_time() - t0)
        await trio.sleep(params.get_interval_s)


async def run_policy(policy: TerminationPolicy, params: MassStopParams) -> dict[str, object]:
    """Run one mass stop under ``policy`` and return its figures."""
    if params.backend == "local":
        with tempfile.TemporaryDirectory(prefix="sledagent-mass-stop-") as tmp:
            local = LocalHost.at(
                Path(tmp), log_rate_bps=0, seed_log_bytes=int(params.log_mb * (1 << 20))
            )
            local.nexus.latency_s = params.nexus_latency_s
            return await _run_policy(policy, params, local)
    fakes = FakeHost(
        zones=FakeZones(command_s=params.command_s, copy_s=params.copy_s),
        nexus=FakeNexus(latency_s=params.nexus_latency_s),
    )
    return await _run_policy(policy, params, fakes)


async def _run_policy(
    policy: TerminationPolicy, params: MassStopParams, fakes: FakeHost | LocalHost
) -> dict[str, object]:
    overrides: dict[str, object] = {}
    if params.archive_concurrency is not None:
        overrides["bundle_archive_concurrency"] = params.archive_concurrency
    config = AgentConfig(
        termination_policy=policy,
        max_zones=max(1024, 2 * params.vmms),
        reaper_backoff=BackoffPolicy(initial_s=0.05, max_s=1.0),
        shutdown_drain_s=3600.0,
        **overrides,  # type: ignore[arg-type]
    )
    async with open_fake_agent(config, fakes) as h:
        ids = [await h.start_vmm() for _ in range(params.vmms)]
        reads: list[float] = []
        timeouts = [0]
        t_halt = trio.current_time()
        async with trio.open_nursery() as nursery:
            for pid in ids:
                fakes.propolis[pid].halt()
            rng = random.Random(params.seed)
            get_state = h.agent.manager.get_state
            for pid in ids:
                offset = rng.uniform(0, params.get_interval_s)
                nursery.start_soon(_probe_reads, get_state, pid, params, reads, timeouts, offset)
            for pid in ids:
                await fakes.nexus.wait_for(pid, VmmState.DESTROYED)
            await h.agent.drain()
            drain_s = trio.current_time() - t_halt
            nursery.cancel_scope.cancel()  # reads went on for the whole drain
        halt_to_publish = []
        for pid in ids:
            published = fakes.nexus.first_time(pid, VmmState.DESTROYED)
            halted = fakes.propolis[pid].halted_at
            assert published is not None and halted is not None
            halt_to_publish.append(published - halted)
        held = h.agent.bundler.statistics().zone_held_s
        return {
            "halt_to_publish_s": summary(halt_to_publish),
            "get_state_s": {**summary(reads), "timeouts": timeouts[0], "reads": len(reads)},
            "zone_held_s": {k: v for k, v in summary(held).items() if k != "max"},
            "drain_s": round(drain_s, 3),
            "bundles": len(await h.agent.store.list_all()),
            "peak_rss_mb": _peak_rss_mb(),
        }


async def run_mass_stop(
    policies: list[TerminationPolicy], params: MassStopParams
) -> dict[str, object]:
    results = {policy.value: await run_policy(policy, params) for policy in policies}
    report: dict[str, object] = {"params": attrs.asdict(params), "policies": results}
    if "reaper" in results and "inline" in results:
        reaper_p99 = results["reaper"]["halt_to_publish_s"]["p99"]  # type: ignore[index]
        inline_p99 = results["inline"]["halt_to_publish_s"]["p99"]  # type: ignore[index]
        report["ratios"] = {
            "halt_to_publish_p99": round(inline_p99 / reaper_p99, 1) if reaper_p99 > 0 else None
        }
    return report
