"""The pure VMM state rules: mapping, generations, migrations (no I/O)."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sledagent._errors import GenerationExhausted
from sledagent._vmm_state import (
    Observation,
    apply_observation,
    initial_state,
    transition,
    vmm_state_of,
)
from sledagent._wire import (
    InstanceMigrateStatusResponse,
    InstanceMigrationStatus,
    InstanceState,
    InstanceStateMonitorResponse,
    MigrationState,
    PropolisMigrationState,
    VmmRuntimeState,
    VmmState,
)

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)

DESIGN_TABLE = {
    InstanceState.CREATING: VmmState.STARTING,
    InstanceState.STARTING: VmmState.STARTING,
    InstanceState.RUNNING: VmmState.RUNNING,
    InstanceState.REPAIRING: VmmState.RUNNING,
    InstanceState.STOPPING: VmmState.STOPPING,
    InstanceState.STOPPED: VmmState.STOPPING,
    InstanceState.REBOOTING: VmmState.REBOOTING,
    InstanceState.MIGRATING: VmmState.MIGRATING,
    InstanceState.FAILED: VmmState.FAILED,
    InstanceState.DESTROYED: VmmState.DESTROYED,
}


@pytest.mark.parametrize(("propolis", "vmm"), DESIGN_TABLE.items())
def test_propolis_states_map_as_the_design_table_says(
    propolis: InstanceState, vmm: VmmState
) -> None:
    assert vmm_state_of(propolis) is vmm


def registered(gen: int = 1, migration_id: uuid.UUID | None = None):  # type: ignore[no-untyped-def]
    return initial_state(
        VmmRuntimeState(gen=gen, state=VmmState.STARTING, time_updated=T0), migration_id, T0
    )


@given(st.lists(st.sampled_from(list(InstanceState)), max_size=30), st.integers(0, 2**40))
def test_an_observation_bumps_the_generation_by_one_exactly_when_the_vmm_state_changes(
    states: list[InstanceState], gen0: int
) -> None:
    state = registered(gen0)
    for i, s in enumerate(states):
        resp = InstanceStateMonitorResponse(gen=i + 1, state=s)
        new = apply_observation(state, Observation.from_monitor(resp, T0))
        assert new.vmm_state.state is vmm_state_of(s)
        if vmm_state_of(s) is state.vmm_state.state:
            assert new is state  # nothing Nexus is told moved: nothing to publish
        else:
            assert new.gen == state.gen + 1
        state = new


def test_an_answer_repeating_the_current_state_is_not_a_new_generation() -> None:
    running = apply_observation(
        registered(7),
        Observation.from_monitor(
            InstanceStateMonitorResponse(gen=3, state=InstanceState.RUNNING), T0
        ),
    )
    assert running.gen == 8
    for gen in (3, 3, 2, 0):  # a Propolis answering the long poll without waiting
        resp = InstanceStateMonitorResponse(gen=gen, state=InstanceState.RUNNING)
        assert apply_observation(running, Observation.from_monitor(resp, T0)) is running


def test_a_generation_at_the_u64_maximum_is_never_advanced() -> None:
    top = registered(2**64 - 1)
    with pytest.raises(GenerationExhausted, match="u64 maximum"):
        transition(top, VmmState.RUNNING, T0)
    assert transition(registered(2**64 - 2), VmmState.RUNNING, T0).gen == 2**64 - 1


def test_a_migration_target_starts_pending_and_tracks_propolis_progress() -> None:
    mig = uuid.uuid4()
    state = registered(migration_id=mig)
    assert state.migration_in is not None and state.migration_in.state is MigrationState.PENDING
    assert state.migration_in.gen == 1

    def observe(s: PropolisMigrationState, vmm: InstanceState = InstanceState.MIGRATING):  # type: ignore[no-untyped-def]
        resp = InstanceStateMonitorResponse(
            gen=1,
            state=vmm,
            migration=InstanceMigrateStatusResponse(migration_in=InstanceMigrationStatus(mig, s)),
        )
        return apply_observation(state, Observation.from_monitor(resp, T0))

    state = observe(PropolisMigrationState.RAM_PUSH)
    assert state.migration_in is not None
    assert (state.migration_in.state, state.migration_in.gen) == (MigrationState.IN_PROGRESS, 2)
    same = observe(PropolisMigrationState.DEVICE)  # still in progress: no spurious update
    assert same.migration_in == state.migration_in
    state = observe(PropolisMigrationState.FINISH, InstanceState.RUNNING)
    assert state.migration_in is not None
    assert (state.migration_in.state, state.migration_in.gen) == (MigrationState.COMPLETED, 3)


def test_a_vmm_that_halts_mid_migration_fails_the_migration() -> None:
    mig = uuid.uuid4()
    resp = InstanceStateMonitorResponse(
        gen=1,
        state=InstanceState.MIGRATING,
        migration=InstanceMigrateStatusResponse(
            migration_out=InstanceMigrationStatus(mig, PropolisMigrationState.SYNC)
        ),
    )
    state = apply_observation(registered(), Observation.from_monitor(resp, T0))
    assert (
        state.migration_out is not None and state.migration_out.state is MigrationState.IN_PROGRESS
    )
    halted = transition(state, VmmState.FAILED, T0)
    assert halted.vmm_state.state is VmmState.FAILED
    assert halted.migration_out is not None
    assert halted.migration_out.state is MigrationState.FAILED
    assert halted.migration_out.gen == state.migration_out.gen + 1


def test_a_completed_migration_is_not_failed_by_a_later_halt() -> None:
    mig = uuid.uuid4()
    resp = InstanceStateMonitorResponse(
        gen=1,
        state=InstanceState.RUNNING,
        migration=InstanceMigrateStatusResponse(
            migration_in=InstanceMigrationStatus(mig, PropolisMigrationState.FINISH)
        ),
    )
    state = apply_observation(registered(migration_id=mig), Observation.from_monitor(resp, T0))
    halted = transition(state, VmmState.DESTROYED, T0)
    assert halted.migration_in == state.migration_in
