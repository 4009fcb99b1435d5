"""Live migration between two sleds on fakes (``sledagent.testing.open_two_sleds``).

Virtual time (``autojump_clock``): the fakes sleep, no thread runs. The rules are
omicron's (``sled-agent/src/instance.rs``, ``common/instance.rs``) and Propolis's
(``migrate/``, ``vm/request_queue.rs``); docs/design.md, "Live migration".
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import trio

from sledagent import MigrationState, VmmState
from sledagent._errors import BadRequest, PropolisRefused, Terminating
from sledagent._registry import VmmEntry
from sledagent._wire import (
    InstanceMigrationTargetParams,
    PropolisMigrationState,
    VmmStateRequested,
    VmmStateRequestedType,
    ZoneBundleCause,
)
from sledagent.testing import (
    FakeNexus,
    Migration,
    TwoSleds,
    ensure_body,
    fast_config,
    open_two_sleds,
)

Phase = PropolisMigrationState
STOP = VmmStateRequested(VmmStateRequestedType.STOPPED)


def migration_side(nexus: FakeNexus, pid: uuid.UUID, out: bool) -> list[MigrationState]:
    """The distinct states Nexus got for one side of a migration, in order."""
    seen: list[MigrationState] = []
    for state in nexus.states_for(pid):
        m = state.migration_out if out else state.migration_in
        if m is not None and (not seen or seen[-1] is not m.state):
            seen.append(m.state)
    return seen


async def migrate_held(sleds: TwoSleds, phase: Phase = Phase.DEVICE) -> Migration:
    """A migration a -> b with both sides under way, held by the source before ``phase``."""
    src = await sleds.start_vmm("a")
    sleds.propolis(src).hold(phase)
    m = await sleds.migrate(src)
    await sleds.propolis(src).wait_held(phase)
    await under_way(sleds, "a", m.source, out=True)
    await under_way(sleds, "b", m.target, out=False)
    return m


async def under_way(sleds: TwoSleds, sled: str, pid: uuid.UUID, *, out: bool) -> None:
    """Wait until the sled's agent has seen the VMM's migration in progress."""

    def seen(e: VmmEntry) -> bool:
        m = e.state.migration_out if out else e.state.migration_in
        return m is not None and m.state is MigrationState.IN_PROGRESS

    await sleds.sleds[sled].running.manager.registry.get(pid).wait_until(seen)


async def test_a_migration_moves_the_guest_reports_both_sides_and_reaps_the_source(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_two_sleds() as sleds:
        src = await sleds.start_vmm("a")
        source_vm = sleds.propolis(src)
        source_vm.migration_phase_s = 1.0  # each phase takes a second: Nexus sees them
        source_vm.write_console("guest: hello")
        m = await sleds.migrate(src)
        record = await sleds.wait(m)
        await sleds.nexus.wait_for(src, VmmState.DESTROYED)
        await sleds.drain()
        nexus = sleds.nexus
        assert record.outcome == "completed" and nexus.ledger.problems == []
        # Each side: under way, then completed, each with its own rising generation.
        assert migration_side(nexus, m.target, out=False)[-2:] == [
            MigrationState.IN_PROGRESS,
            MigrationState.COMPLETED,
        ]
        assert migration_side(nexus, src, out=True) == [
            MigrationState.IN_PROGRESS,
            MigrationState.COMPLETED,
        ]
        assert [r.gen for r in record.source] == sorted({r.gen for r in record.source})
        assert nexus.latest(src).vmm_state.state is VmmState.DESTROYED  # type: ignore[union-attr]
        target = sleds.state("b", m.target)
        assert target.vmm_state.state is VmmState.RUNNING
        assert target.migration_in is not None
        assert target.migration_in.state is MigrationState.COMPLETED
        # The guest's console came along; the source's zone was bundled and torn down.
        assert "guest: hello" in sleds.propolis(m.target).console
        assert sleds.a.fakes.zones.zones == {}
        causes = [j.metadata.cause for j in sleds.a.fakes.zones.archived_jobs]
        assert causes == [ZoneBundleCause.TERMINATED_INSTANCE]
        assert list(sleds.b.fakes.zones.zones) == [f"oxz_propolis-server_{m.target}"]


async def test_the_target_propolis_is_created_as_a_migration_target_from_the_registration(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_two_sleds() as sleds:
        m = await migrate_held(sleds)
        init = sleds.propolis(m.target).ensured.init  # type: ignore[union-attr]
        assert init["method"] == "MigrationTarget"
        assert init["value"]["migration_id"] == str(m.migration_id)
        assert init["value"]["src_addr"] == sleds._addrs[m.source]
        state = sleds.state("b", m.target)
        assert state.migration_in is not None and state.migration_in.gen >= 2
        assert state.vmm_state.state is VmmState.MIGRATING
        assert sleds.state("a", m.source).vmm_state.state is VmmState.MIGRATING


async def test_migration_target_of_a_vmm_registered_without_a_migration_id_is_refused(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_two_sleds() as sleds:
        src = await sleds.start_vmm("a")
        manager = sleds.b.running.manager
        pid = uuid.uuid4()
        manager.register(pid, ensure_body(propolis_addr="[fd00:b::99]:12400"))
        params = InstanceMigrationTargetParams(src_propolis_addr=sleds._addrs[src])
        with pytest.raises(BadRequest, match="migration_id"):
            await manager.put_state(
                pid, VmmStateRequested(VmmStateRequestedType.MIGRATION_TARGET, params)
            )
        assert sleds.state("b", pid).vmm_state.state is VmmState.STARTING  # untouched
        assert sleds.b.fakes.zones.zones == {}


async def test_a_stop_of_the_source_waits_for_the_migration_which_still_completes(
    autojump_clock: trio.abc.Clock,
) -> None:
    """omicron publishes ``stopping`` and sends Propolis Stop; Propolis queues the stop
    behind the migration out; the guest moves, the source ends."""
    async with open_two_sleds() as sleds:
        m = await migrate_held(sleds)
        answer = await sleds.a.running.manager.put_state(m.source, STOP)
        assert answer.updated_runtime is not None
        assert answer.updated_runtime.vmm_state.state is VmmState.STOPPING
        assert answer.updated_runtime.migration_out is not None
        assert answer.updated_runtime.migration_out.state is MigrationState.IN_PROGRESS
        sleds.propolis(m.source).hold(Phase.DEVICE, on=False)
        record = await sleds.wait(m)
        assert record.outcome == "completed"
        await sleds.nexus.wait_for(m.source, VmmState.DESTROYED)
        assert sleds.state("b", m.target).vmm_state.state is VmmState.RUNNING
        assert sleds.nexus.ledger.problems == []


async def test_a_stop_of_the_source_whose_migration_then_fails_stops_the_source(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_two_sleds() as sleds:
        m = await migrate_held(sleds)
        source_vm = sleds.propolis(m.source)
        source_vm.migration_fail_at = Phase.DEVICE
        await sleds.a.running.manager.put_state(m.source, STOP)
        source_vm.hold(Phase.DEVICE, on=False)
        record = await sleds.wait(m)
        assert record.outcome == "failed"
        await sleds.nexus.wait_for(m.source, VmmState.DESTROYED)
        last = sleds.nexus.latest(m.source)
        assert last is not None and last.migration_out is not None
        assert last.migration_out.state is MigrationState.FAILED
        await sleds.nexus.wait_for(m.target, VmmState.FAILED)
        await sleds.drain()
        assert sleds.a.fakes.zones.zones == {} and sleds.b.fakes.zones.zones == {}
        assert sleds.nexus.ledger.problems == []


async def test_a_stop_of_the_target_while_it_migrates_in_fails_it_and_the_source_resumes(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Propolis has no active VM on a target until it has migrated in: its answer is
    ``NoInstance`` for a VM seen live, so the VMM fails at once (omicron: ``NoInstance``
    from a state put -> ``fail_vmm_and_terminate``)."""
    async with open_two_sleds() as sleds:
        m = await migrate_held(sleds)
        with pytest.raises(Terminating):
            await sleds.b.running.manager.put_state(m.target, STOP)
        await sleds.nexus.wait_for(m.target, VmmState.FAILED)
        target = sleds.nexus.latest(m.target)
        assert target is not None and target.migration_in is not None
        assert target.migration_in.state is MigrationState.FAILED
        # The target's zone goes, and with it its Propolis: the source stops waiting for
        # it (its idle deadline), fails its side and the guest runs on.
        sleds.propolis(m.source).hold(Phase.DEVICE, on=False)
        record = await sleds.wait(m)
        assert record.outcome == "failed"
        source = sleds.state("a", m.source)
        assert source.vmm_state.state is VmmState.RUNNING
        assert source.migration_out is not None
        assert source.migration_out.state is MigrationState.FAILED
        assert sleds.nexus.ledger.problems == []


@pytest.mark.parametrize("side", ["target", "source"])
async def test_an_unregister_during_a_migration_fails_the_vmm_and_its_side_of_it(
    side: str, autojump_clock: trio.abc.Clock
) -> None:
    """omicron's ``handle_termination_request``: ``fail_vmm_and_terminate`` (the VMM and
    any active migration: failed, generation + 1), the zone removed."""
    async with open_two_sleds() as sleds:
        m = await migrate_held(sleds)
        sled, pid = ("b", m.target) if side == "target" else ("a", m.source)
        before = sleds.state(sled, pid)
        answer = await sleds.sleds[sled].running.manager.unregister(pid)
        state = answer.updated_runtime
        assert state is not None and state.vmm_state.state is VmmState.FAILED
        mine, was = (
            (state.migration_in, before.migration_in)
            if side == "target"
            else (state.migration_out, before.migration_out)
        )
        assert mine is not None and was is not None
        assert mine.state is MigrationState.FAILED and mine.gen == was.gen + 1
        sleds.propolis(m.source).hold(Phase.DEVICE, on=False)
        record = await sleds.wait(m)
        assert record.outcome == "failed"
        await sleds.drain()
        assert sleds.nexus.ledger.problems == []
        if side == "target":
            assert sleds.state("a", m.source).vmm_state.state is VmmState.RUNNING
        else:
            await sleds.nexus.wait_for(m.target, VmmState.FAILED)
            assert sleds.a.fakes.zones.zones == {} and sleds.b.fakes.zones.zones == {}


async def test_a_target_whose_source_never_answers_fails_at_the_deadline(
    autojump_clock: trio.abc.Clock,
) -> None:
    config = fast_config(migration_source_timeout_s=30.0)
    async with open_two_sleds(config) as sleds:
        src = await sleds.start_vmm("a")
        sleds.propolis(src).hold(Phase.SYNC)  # the source never answers the start
        t0 = trio.current_time()
        m = await sleds.migrate(src)
        await sleds.nexus.wait_for(m.target, VmmState.FAILED)
        assert trio.current_time() - t0 == pytest.approx(30.0, abs=0.5)
        record = await sleds.wait(m)
        assert record.outcome == "failed" and record.source == []
        await sleds.drain()
        assert sleds.b.fakes.zones.zones == {}
        assert sleds.state("a", src).vmm_state.state is VmmState.RUNNING


async def test_the_source_deadline_does_not_limit_a_migration_under_way(
    autojump_clock: trio.abc.Clock,
) -> None:
    config = fast_config(migration_source_timeout_s=30.0)
    async with open_two_sleds(config) as sleds:
        m = await migrate_held(sleds)
        await trio.sleep(300)  # a long RAM transfer: ten deadlines
        sleds.propolis(m.source).hold(Phase.DEVICE, on=False)
        assert (await sleds.wait(m)).outcome == "completed"


async def test_a_source_unreachable_fails_the_target_at_once(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_two_sleds() as sleds:
        src = await sleds.start_vmm("a")
        sleds._addrs[src] = "[fd00:a::dead]:12400"  # Nexus hands out an address nobody has
        m = await sleds.migrate(src)
        record = await sleds.wait(m)
        assert record.outcome == "failed"
        assert trio.current_time() < 1.0
        assert migration_side(sleds.nexus, m.target, out=False)[-1] is MigrationState.FAILED


async def test_a_reboot_of_a_migrating_source_is_refused_and_changes_nothing(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Propolis refuses it (``InvalidForMigrationSource``, 403): the reboot belongs to
    wherever the guest ends up."""
    async with open_two_sleds() as sleds:
        m = await migrate_held(sleds)
        before = sleds.state("a", m.source)
        with pytest.raises(PropolisRefused) as refused:
            await sleds.a.running.manager.put_state(
                m.source, VmmStateRequested(VmmStateRequestedType.REBOOT)
            )
        assert refused.value.status == 403
        assert sleds.state("a", m.source) == before


async def test_a_migration_back_and_forth_keeps_one_guest_and_clean_records(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_two_sleds() as sleds:
        pid = await sleds.start_vmm("a")
        sleds.propolis(pid).write_console("guest: one")
        for _ in range(3):
            m = await sleds.migrate(pid)
            assert (await sleds.wait(m)).outcome == "completed"
            await sleds.nexus.wait_for(m.source, VmmState.DESTROYED)
            pid = m.target
        await sleds.drain()
        assert sleds.nexus.ledger.problems == []
        assert "guest: one" in sleds.propolis(pid).console
        zones = list(sleds.a.fakes.zones.zones) + list(sleds.b.fakes.zones.zones)
        assert zones == [f"oxz_propolis-server_{pid}"]


async def test_a_repeated_migration_target_request_is_answered_and_changes_nothing(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Nexus's saga steps are retried: the same request again must be an answer, not a
    second VM (omicron #447's idempotency requirement)."""
    async with open_two_sleds() as sleds:
        m = await migrate_held(sleds)
        target_vm = sleds.propolis(m.target)
        ensured = target_vm.ensured
        params = InstanceMigrationTargetParams(src_propolis_addr=sleds._addrs[m.source])
        again = await sleds.b.running.manager.put_state(
            m.target, VmmStateRequested(VmmStateRequestedType.MIGRATION_TARGET, params)
        )
        assert again.updated_runtime == sleds.state("b", m.target)
        assert sleds.propolis(m.target) is target_vm and target_vm.ensured is ensured
        sleds.propolis(m.source).hold(Phase.DEVICE, on=False)
        assert (await sleds.wait(m)).outcome == "completed"
        assert sleds.nexus.ledger.problems == []


async def test_a_pending_target_gets_its_source_deadline_again_after_a_restart(
    tmp_path: Path,
) -> None:
    """The target's sled is killed while it waits for a silent source: the next start
    takes it back and the deadline runs again (docs/design.md), so it still ends
    ``failed`` with ``migration_in: failed``, never waits for ever (a QA mutation)."""
    config = fast_config(migration_source_timeout_s=2.0)
    with trio.fail_after(60):
        async with open_two_sleds(config, journal_dir=tmp_path) as sleds:
            src = await sleds.start_vmm("a")
            sleds.propolis(src).hold(Phase.SYNC)  # the source never answers the start
            m = await sleds.migrate(src)
            await sleds.restart("b", kill=True)
            await sleds.nexus.wait_for(m.target, VmmState.FAILED)
            final = sleds.nexus.latest(m.target)
            assert final is not None and final.migration_in is not None
            assert final.migration_in.state is MigrationState.FAILED
            assert sleds.state("a", src).vmm_state.state is VmmState.RUNNING
            await sleds.drain()
            assert sleds.nexus.ledger.problems == []
