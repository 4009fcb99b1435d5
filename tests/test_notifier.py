"""Nexus deliveries: newest generation only, in order, nothing lost, never blocking."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest
import trio

from sledagent import BackoffPolicy, NexusNotifier, SledVmmState, VmmRuntimeState, VmmState
from sledagent._wire import InstanceState
from sledagent.testing import FakeHost, FakeNexus, fast_config, open_fake_agent


def state(gen: int, s: VmmState = VmmState.RUNNING) -> SledVmmState:
    return SledVmmState(VmmRuntimeState(gen=gen, state=s, time_updated=dt.datetime.now(dt.UTC)))


async def test_terminal_states_sent_while_nexus_fails_for_30s_are_all_delivered_after_it_recovers(
    autojump_clock: trio.abc.Clock,
) -> None:
    fakes = FakeHost()
    async with open_fake_agent(fast_config(), fakes) as h:
        ids = [await h.start_vmm() for _ in range(20)]
        running = {pid: fakes.nexus.latest(pid) for pid in ids}
        fakes.nexus.fail_for(30.0, status=503)
        t0 = trio.current_time()
        for pid in ids:
            fakes.propolis[pid].push(InstanceState.STOPPING)  # published, then failing
        await trio.sleep(1.0)
        for pid in ids:
            fakes.propolis[pid].push(InstanceState.STOPPED)
            fakes.propolis[pid].push(InstanceState.DESTROYED)
        for pid in ids:
            await fakes.nexus.wait_for(pid, VmmState.DESTROYED)
        # The runners and reads were never blocked meanwhile.
        assert h.agent.notifier.statistics().retries > 0

    for pid in ids:
        delivered = fakes.nexus.states_for(pid)
        gens = [s.gen for s in delivered]
        assert gens == sorted(set(gens)), "out of order or duplicated"
        after = [s for s in delivered if s.gen > (running[pid].gen if running[pid] else 0)]
        # Only the newest state was delivered once Nexus recovered: the failed
        # `stopping` was superseded by the terminal one.
        assert [s.vmm_state.state for s in after] == [VmmState.DESTROYED]
        assert fakes.nexus.first_time(pid, VmmState.DESTROYED) >= t0 + 30.0  # type: ignore[operator]
    assert all(u.time >= t0 + 30.0 for u in fakes.nexus.updates if u.time > t0)


async def test_connection_failures_are_retried_with_doubling_backoff(
    autojump_clock: trio.abc.Clock,
) -> None:
    nexus = FakeNexus()
    notifier = NexusNotifier(
        nexus, backoff=BackoffPolicy(initial_s=0.25, max_s=180.0), concurrency=4
    )
    pid = uuid.uuid4()
    async with trio.open_nursery() as nursery:
        await nursery.start(notifier.run)
        nexus.fail_for(2.0, status=None)
        t0 = trio.current_time()
        notifier.publish(pid, state(5))
        await nexus.wait_for(pid, VmmState.RUNNING)
        # 0 + .25 + .5 + 1 + 2 (>= 2 s after start): five attempts, delivered at 3.75 s.
        assert nexus.attempts == 5
        assert trio.current_time() - t0 == pytest.approx(3.75)
        nursery.cancel_scope.cancel()


async def test_a_4xx_is_final_counted_and_never_retried(autojump_clock: trio.abc.Clock) -> None:
    nexus = FakeNexus()
    refused: list[tuple[int, bool]] = []
    notifier = NexusNotifier(
        nexus,
        backoff=BackoffPolicy(),
        concurrency=4,
        on_delivered=lambda pid, s, ok: refused.append((s.gen, ok)),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(notifier.run)
        nexus.refuse(1, status=400)
        notifier.publish(uuid.uuid4(), state(2))
        await notifier.wait_idle()
        nursery.cancel_scope.cancel()
    assert refused == [(2, False)]
    assert nexus.attempts == 1
    assert notifier.statistics().gave_up == 1


async def test_an_older_generation_is_never_sent_after_a_newer_one(
    autojump_clock: trio.abc.Clock,
) -> None:
    nexus = FakeNexus(latency_s=1.0)
    notifier = NexusNotifier(nexus, backoff=BackoffPolicy(), concurrency=4)
    pid = uuid.uuid4()
    async with trio.open_nursery() as nursery:
        await nursery.start(notifier.run)
        notifier.publish(pid, state(2))
        notifier.publish(pid, state(3))  # supersedes 2 before it was sent
        await trio.sleep(0.5)  # 3 is in flight now
        notifier.publish(pid, state(5))
        notifier.publish(pid, state(4))  # stale: dropped
        notifier.publish(pid, state(1))  # stale: dropped
        await notifier.wait_idle()
        nursery.cancel_scope.cancel()
    assert [s.gen for s in nexus.states_for(pid)] == [3, 5]
    assert notifier.statistics().superseded == 1


async def test_publish_never_blocks_even_with_a_slow_nexus(autojump_clock: trio.abc.Clock) -> None:
    nexus = FakeNexus(latency_s=60.0)
    notifier = NexusNotifier(nexus, backoff=BackoffPolicy(), concurrency=1)
    async with trio.open_nursery() as nursery:
        await nursery.start(notifier.run)
        t = trio.current_time()
        for gen in range(1000):
            notifier.publish(uuid.uuid4(), state(gen))
        assert trio.current_time() == t
        assert notifier.statistics().pending == 1000
        nursery.cancel_scope.cancel()


async def test_publishing_settles_when_states_are_delivered_or_backing_off(
    autojump_clock: trio.abc.Clock,
) -> None:
    nexus = FakeNexus(latency_s=1.0)
    notifier = NexusNotifier(nexus, backoff=BackoffPolicy(), concurrency=4)
    async with trio.open_nursery() as nursery:
        await nursery.start(notifier.run)
        t0 = trio.current_time()
        notifier.publish(uuid.uuid4(), state(2))
        await notifier.wait_settled()  # under way for the 1 s round trip
        assert trio.current_time() - t0 == pytest.approx(1.0)
        nexus.latency_s = 0.0
        nexus.fail_for(60.0)
        t1 = trio.current_time()
        notifier.publish(uuid.uuid4(), state(2))
        await notifier.wait_settled()  # failed at once, now backing off: settled
        assert trio.current_time() - t1 == pytest.approx(0.0)
        assert notifier.statistics().pending == 1  # still to deliver, once Nexus is back
        nursery.cancel_scope.cancel()
