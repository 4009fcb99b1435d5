"""Phase 2's admission (``ArchiveSlots``): more slots for small bundles, never for large
ones, first come first served, and nothing held by a bundle cancelled while it waits."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from sledagent._archive_slots import ArchiveSlots

MB = 1 << 20


async def _archive(
    slots: ArchiveSlots, nbytes: int, seconds: float, peak: list[int], order: list[int], tag: int
) -> None:
    async with slots.hold(nbytes):
        order.append(tag)
        peak[0] = max(peak[0], slots.running)
        # What the admission promises: beyond the base slots, only within the budget.
        assert slots.running <= slots.max_slots
        if slots.running > slots.slots:
            assert slots.bytes_in_flight <= slots.small_bytes
        await trio.sleep(seconds)


async def test_small_bundles_take_the_extra_slots_and_large_ones_do_not(
    autojump_clock: trio.abc.Clock,
) -> None:
    for size, expected_peak in ((1 * MB, 4), (10 * MB, 2)):
        slots = ArchiveSlots(2, max_slots=4, small_bytes=16 * MB)
        peak, order = [0], []
        async with trio.open_nursery() as nursery:
            for i in range(12):
                nursery.start_soon(_archive, slots, size, 1.0, peak, order, i)
        assert peak[0] == expected_peak, size
        assert slots.running == 0 and slots.bytes_in_flight == 0


async def test_a_large_bundle_waiting_first_is_not_overtaken_by_small_ones(
    autojump_clock: trio.abc.Clock,
) -> None:
    slots = ArchiveSlots(1, max_slots=4, small_bytes=4 * MB)
    order: list[int] = []
    peak = [0]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_archive, slots, 1 * MB, 5.0, peak, order, 0)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(_archive, slots, 8 * MB, 1.0, peak, order, 1)  # over the budget
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(_archive, slots, 1 * MB, 1.0, peak, order, 2)  # would fit
        await trio.testing.wait_all_tasks_blocked()
        assert order == [0] and slots.waiting == 2
    assert order == [0, 1, 2]


async def test_a_bundle_cancelled_while_waiting_holds_no_slot_and_lets_the_next_in(
    autojump_clock: trio.abc.Clock,
) -> None:
    slots = ArchiveSlots(1, max_slots=2, small_bytes=2 * MB)
    order: list[int] = []
    peak = [0]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_archive, slots, 1 * MB, 10.0, peak, order, 0)
        await trio.testing.wait_all_tasks_blocked()
        big = trio.CancelScope()

        async def big_bundle() -> None:
            with big:
                await _archive(slots, 8 * MB, 1.0, peak, order, 1)

        nursery.start_soon(big_bundle)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(_archive, slots, 1 * MB, 1.0, peak, order, 2)
        await trio.testing.wait_all_tasks_blocked()
        assert order == [0] and slots.waiting == 2  # the small one waits behind it
        big.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert order == [0, 2]  # the head went: the small one fits beside bundle 0
    assert slots.running == 0 and slots.bytes_in_flight == 0 and slots.waiting == 0


async def test_a_slot_granted_to_a_bundle_cancelled_before_it_ran_is_given_back() -> None:
    slots = ArchiveSlots(1)
    go = trio.Event()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            with trio.CancelScope() as scope:

                async def holder() -> None:
                    async with slots.hold(1):
                        await go.wait()
                        scope.cancel()  # the waiter below is cancelled, then (leaving
                        # this block, same step) granted the slot before it runs

                nursery.start_soon(holder)
                await trio.testing.wait_all_tasks_blocked()
                go.set()
                async with slots.hold(1):
                    pytest.fail("cancelled before it ran: must not get here")
            assert scope.cancelled_caught
    assert slots.running == 0 and slots.bytes_in_flight == 0 and slots.waiting == 0


def test_bounds_that_admit_nothing_are_refused() -> None:
    with pytest.raises(ValueError, match="slots"):
        ArchiveSlots(0)
    with pytest.raises(ValueError, match="max_slots"):
        ArchiveSlots(3, max_slots=2)


@settings(max_examples=40, deadline=None)
@given(
    base=st.integers(1, 3),
    extra=st.integers(0, 3),
    budget_mb=st.integers(0, 20),
    bundles=st.lists(st.tuples(st.integers(0, 12), st.integers(1, 5)), min_size=1, max_size=25),
)
def test_every_bundle_is_archived_within_the_bounds(
    base: int, extra: int, budget_mb: int, bundles: list[tuple[int, int]]
) -> None:
    async def main() -> None:
        slots = ArchiveSlots(base, max_slots=base + extra, small_bytes=budget_mb * MB)
        peak, order = [0], []
        async with trio.open_nursery() as nursery:
            for i, (mb, seconds) in enumerate(bundles):
                nursery.start_soon(_archive, slots, mb * MB, float(seconds), peak, order, i)
        assert sorted(order) == list(range(len(bundles)))
        assert slots.running == 0 and slots.bytes_in_flight == 0

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_config_with_fewer_small_bundle_slots_than_slots_is_refused_naming_both() -> None:
    from sledagent._config import AgentConfig

    with pytest.raises(
        ValueError,
        match=r"bundle_archive_max_concurrency .2. must be >= bundle_archive_concurrency .4.",
    ):
        AgentConfig(bundle_archive_concurrency=4, bundle_archive_max_concurrency=2)
    assert AgentConfig(bundle_archive_concurrency=3).archive_max_slots == 6  # 0: twice
    assert (
        AgentConfig(
            bundle_archive_concurrency=3, bundle_archive_max_concurrency=3
        ).archive_max_slots
        == 3
    )
