"""Many VMMs halting at once: published at once under the reaper, late under inline.

Virtual time (``autojump_clock``): bundles "take" 60 s of clock time through the fakes.
"""

from __future__ import annotations

import uuid

import pytest
import trio
import trio.lowlevel

from sledagent import NoSuchVmm, Terminating, TerminationPolicy, VmmPhase
from sledagent._wire import VmmState, VmmStateRequestedType
from sledagent.testing import (
    AgentHarness,
    FakeHost,
    FakeNexus,
    FakeZones,
    fast_config,
    open_fake_agent,
)


async def wait_until_all_halted(h: AgentHarness, ids: list[uuid.UUID]) -> None:
    for pid in ids:
        entry = h.agent.manager.registry.find(pid)
        if entry is not None:
            await entry.wait_until(lambda e: e.phase is not VmmPhase.ACTIVE)


async def test_hundred_halting_vmms_are_published_within_a_second_before_any_bundle_finishes(
    autojump_clock: trio.abc.Clock,
) -> None:
    fakes = FakeHost(
        zones=FakeZones(command_s=30.0, copy_s=30.0),  # each bundle: 60 s
        nexus=FakeNexus(latency_s=0.2),  # so the halted-but-unacknowledged window is visible
    )
    async with open_fake_agent(fast_config(bundle_archive_concurrency=2), fakes) as h:
        ids = [await h.start_vmm() for _ in range(100)]
        halted_at = trio.current_time()
        for pid in ids:
            fakes.propolis[pid].halt()
        await wait_until_all_halted(h, ids)

        # While Nexus has not acknowledged yet: reads answer at once, changes are refused.
        for pid in ids:
            t = trio.current_time()
            state = await h.agent.manager.get_state(pid)
            assert trio.current_time() == t, "GET state waited"
            assert state.vmm_state.state is VmmState.DESTROYED
            with pytest.raises(Terminating):
                await h.request(pid, VmmStateRequestedType.RUNNING)

        published = [await fakes.nexus.wait_for(pid, VmmState.DESTROYED) for pid in ids]
        assert max(published) - halted_at <= 1.0
        await trio.lowlevel.checkpoint()
        for pid in ids:
            with pytest.raises(NoSuchVmm):
                await h.agent.manager.get_state(pid)

        await h.agent.drain()
        first_bundle_done = min(t for tl in fakes.zones.timeline.values() for t in tl.archived_at)
        assert max(published) < first_bundle_done
        assert len(fakes.store.index) == 100
        assert fakes.zones.zones == {}


async def inline_publish_delays(bundle_s: float, n: int) -> list[float]:
    fakes = FakeHost(zones=FakeZones(command_s=bundle_s / 2, copy_s=bundle_s / 2))
    config = fast_config(termination_policy=TerminationPolicy.INLINE)
    async with open_fake_agent(config, fakes) as h:
        ids = [await h.start_vmm() for _ in range(n)]
        t0 = trio.current_time()
        for pid in ids:
            fakes.propolis[pid].halt()
        return [await fakes.nexus.wait_for(pid, VmmState.DESTROYED) - t0 for pid in ids]


async def test_inline_policy_reproduces_publish_times_that_grow_with_bundle_time(
    autojump_clock: trio.abc.Clock,
) -> None:
    short = await inline_publish_delays(10.0, 10)
    long = await inline_publish_delays(60.0, 10)
    # The old bug, on purpose: every publish waits for its own bundle, and the host-wide
    # lock makes the last VMM wait for all ten bundles.
    eps = 1e-6  # clock arithmetic in floats
    assert min(short) >= 10.0 - eps
    assert min(long) >= 60.0 - eps
    assert max(long) >= 10 * 60.0 - eps
    assert max(long) >= 5 * max(short)
