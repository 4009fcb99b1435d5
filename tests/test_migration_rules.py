"""The pure rules of a migration: the agent's (``_migration``, ``_vmm_state``) and what
the recording Nexus checks (``testing/_ledger.py``). No I/O."""

from __future__ import annotations

import datetime as dt
import uuid

import hypothesis.strategies as st
import pytest
from hypothesis import given

from sledagent._errors import BadRequest
from sledagent._migration import (
    migration_active,
    migration_pending,
    migration_target_init,
    unregister_state,
)
from sledagent._vmm_state import Observation, apply_observation, initial_state, transition
from sledagent._wire import (
    InstanceMigrateStatusResponse,
    InstanceMigrationStatus,
    InstanceMigrationTargetParams,
    InstanceState,
    InstanceStateMonitorResponse,
    MigrationRuntimeState,
    MigrationState,
    PropolisMigrationState,
    SledVmmState,
    VmmRuntimeState,
    VmmState,
)
from sledagent.testing import ensure_body
from sledagent.testing._ledger import MigrationLedger

NOW = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
MID = uuid.UUID(int=7)
P = MigrationState


def vmm(state: VmmState = VmmState.RUNNING, gen: int = 1) -> VmmRuntimeState:
    return VmmRuntimeState(gen=gen, state=state, time_updated=NOW)


def mig(state: MigrationState, gen: int, mid: uuid.UUID = MID) -> MigrationRuntimeState:
    return MigrationRuntimeState(gen=gen, migration_id=mid, state=state, time_updated=NOW)


def test_the_target_init_carries_the_registered_migration_id_and_the_source_address() -> None:
    body = ensure_body(migration_id=MID)
    init = migration_target_init(body, InstanceMigrationTargetParams("10.0.0.5:12400"))
    assert init == {
        "method": "MigrationTarget",
        "value": {
            "migration_id": str(MID),
            "replace_components": {},
            "src_addr": "10.0.0.5:12400",
        },
    }


def test_a_target_init_needs_a_registered_migration_id_and_a_source() -> None:
    with pytest.raises(BadRequest, match="migration_id"):
        migration_target_init(ensure_body(), InstanceMigrationTargetParams("10.0.0.5:12400"))
    for bad in (
        "",
        "propolis:12400",
        "10.0.0.5",
        "10.0.0.5:99999",
        "fd00::1:12400",
        "[10.0.0.5]:1",
    ):
        # Refused where the body is built (over the wire: decoded, a 400 naming it).
        with pytest.raises((BadRequest, ValueError), match="src_propolis_addr"):
            migration_target_init(ensure_body(migration_id=MID), InstanceMigrationTargetParams(bad))
    ok = migration_target_init(
        ensure_body(migration_id=MID), InstanceMigrationTargetParams("[fd00::1]:12400")
    )
    assert ok["value"]["src_addr"] == "[fd00::1]:12400"


def test_an_unregister_fails_a_vmm_only_while_a_migration_is_active() -> None:
    assert unregister_state(SledVmmState(vmm())) is VmmState.DESTROYED
    for side in ("migration_in", "migration_out"):
        for active, expected in ((P.IN_PROGRESS, VmmState.FAILED), (P.COMPLETED, None)):
            state = SledVmmState(vmm(), **{side: mig(active, 2)})
            assert migration_active(state) is (expected is not None)
            assert unregister_state(state) is (expected or VmmState.DESTROYED)
    pending = initial_state(vmm(VmmState.STARTING), MID, NOW)
    assert migration_pending(pending) and unregister_state(pending) is VmmState.FAILED


def test_forcing_a_terminal_state_fails_the_active_migration_one_generation_on() -> None:
    state = SledVmmState(vmm(VmmState.MIGRATING, 4), migration_out=mig(P.IN_PROGRESS, 3))
    ended = transition(state, VmmState.FAILED, NOW)
    assert ended.migration_out == mig(P.FAILED, 4)
    assert ended.gen == 5


def test_a_stop_during_a_migration_leaves_the_migration_as_it_was() -> None:
    state = SledVmmState(vmm(VmmState.MIGRATING, 4), migration_out=mig(P.IN_PROGRESS, 3))
    stopping = transition(state, VmmState.STOPPING, NOW)
    assert stopping.migration_out == state.migration_out
    assert stopping.vmm_state.state is VmmState.STOPPING


# Propolis's phases as the state monitor shows them (``migration_state_of``: every phase
# but Finish and Error is "in progress").
PHASES = ["Sync", "RamPush", "RamPushDirty", "Device", "RamPull", "Server"]


@given(
    seen=st.lists(st.sampled_from(PHASES), max_size=8).map(sorted),
    end=st.sampled_from(["Finish", "Error", None]),
    halt=st.booleans(),
)
def test_a_side_reports_with_rising_generations_and_never_leaves_its_end(
    seen: list[str], end: str | None, halt: bool
) -> None:
    """Whatever subset of Propolis's phases the monitor happens to see, each report the
    agent makes of a side is a new generation only when its state changes, and the
    ledger (Nexus's checks) finds nothing wrong."""
    state = initial_state(vmm(VmmState.STARTING), MID, NOW)
    ledger = MigrationLedger()
    pid = uuid.uuid4()
    ledger.observe(0.0, pid, state)
    steps = [*seen, *([end] if end else [])]
    for i, phase in enumerate(steps):
        status = InstanceMigrationStatus(MID, PropolisMigrationState(phase))
        running = phase == "Finish"
        answer = InstanceStateMonitorResponse(
            gen=i + 1,
            state=InstanceState.RUNNING if running else InstanceState.MIGRATING,
            migration=InstanceMigrateStatusResponse(migration_in=status),
        )
        new = apply_observation(state, Observation.from_monitor(answer, NOW))
        assert new.gen >= state.gen
        if new is not state:
            ledger.observe(float(i + 1), pid, new)
        state = new
    if halt:
        state = transition(state, VmmState.FAILED, NOW)
        ledger.observe(99.0, pid, state)
    assert ledger.vmm_problems == []
    assert ledger.migrations[MID].problems == []
    final = state.migration_in
    assert final is not None
    if end == "Finish":
        assert final.state is P.COMPLETED  # a later halt does not undo it
    elif end == "Error" or halt:
        assert final.state is P.FAILED


def test_the_ledger_names_a_generation_that_goes_back_or_changes_content() -> None:
    ledger = MigrationLedger()
    pid = uuid.uuid4()
    ledger.observe(0, pid, SledVmmState(vmm(gen=3), migration_in=mig(P.IN_PROGRESS, 3)))
    ledger.observe(1, pid, SledVmmState(vmm(gen=2), migration_in=mig(P.IN_PROGRESS, 2)))
    ledger.observe(2, pid, SledVmmState(vmm(VmmState.STOPPING, 3), migration_in=mig(P.FAILED, 3)))
    found = " | ".join(ledger.problems)
    assert "generation 2 after 3" in found
    assert "sent with two contents" in found
    assert "sent as in_progress and as failed" in found


def test_the_ledger_names_a_migration_side_whose_generation_goes_back_alone() -> None:
    """The VMM's generation rises, the migration side's goes back: caught on its own
    (the VMM-level check must not be what finds it)."""
    ledger = MigrationLedger()
    pid = uuid.uuid4()
    ledger.observe(0, pid, SledVmmState(vmm(gen=3), migration_in=mig(P.IN_PROGRESS, 3)))
    ledger.observe(1, pid, SledVmmState(vmm(gen=4), migration_in=mig(P.IN_PROGRESS, 2)))
    assert ledger.problems == [
        f"migration {mig(P.IN_PROGRESS, 2).migration_id}: target generation 2 after 3"
    ]


def test_the_ledger_accepts_a_repeat_and_names_a_state_that_leaves_its_end() -> None:
    ledger = MigrationLedger()
    pid = uuid.uuid4()
    done = SledVmmState(vmm(gen=4), migration_out=mig(P.COMPLETED, 3))
    ledger.observe(0, pid, done)
    ledger.observe(1, pid, done)  # delivered twice: fine
    assert ledger.problems == []
    ledger.observe(2, pid, SledVmmState(vmm(gen=5), migration_out=mig(P.IN_PROGRESS, 4)))
    assert any("left completed for in_progress" in p for p in ledger.problems)


@pytest.mark.parametrize(
    ("target", "source", "outcome"),
    [
        (P.COMPLETED, P.COMPLETED, "completed"),
        (P.FAILED, P.FAILED, "failed"),
        (P.FAILED, None, "failed"),
        (P.FAILED, P.COMPLETED, "inconsistent"),
        (P.COMPLETED, P.FAILED, "inconsistent"),
        (P.IN_PROGRESS, P.COMPLETED, "in_progress"),
    ],
)
def test_the_ledger_judges_how_the_two_sides_ended(
    target: MigrationState, source: MigrationState | None, outcome: str
) -> None:
    ledger = MigrationLedger()
    t, s = uuid.uuid4(), uuid.uuid4()
    ledger.observe(0, t, SledVmmState(vmm(gen=2), migration_in=mig(target, 2)))
    if source is not None:
        ledger.observe(0, s, SledVmmState(vmm(gen=2), migration_out=mig(source, 2)))
    record = ledger.migrations[MID]
    assert record.outcome == outcome
    assert any("inconsistent" in p for p in ledger.problems) is (outcome == "inconsistent")
