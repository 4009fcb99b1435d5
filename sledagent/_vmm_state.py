"""Pure state logic of one VMM: Propolis observations in, ``SledVmmState`` out.

No I/O and no clock of its own (callers pass ``now``), so every rule here is tested
directly (``tests/test_vmm_state.py``). The rules are omicron's
(``sled-agent/src/common/instance.rs``): a halted VMM fails any migration still in
flight; a stop or reboot the agent asks for is published at once as
``stopping``/``rebooting``. One departure: omicron bumps the generation on every
observation; here an observation that changes nothing Nexus is told (the VMM state and
both migrations) returns the current state unchanged, so it is not published (a Propolis
that answers the long poll without waiting made 195 PUTs in 10 s for a VMM whose state
never moved; issue "Propolis and Nexus semantics at the edges"). Generations are u64 on
the wire: an increment past 2^64 - 1 raises ``GenerationExhausted``, it is never sent.
"""

from __future__ import annotations

import datetime as dt
import uuid

import attrs

from ._errors import GenerationExhausted
from ._wire import (
    U64_MAX,
    InstanceMigrationStatus,
    InstanceState,
    InstanceStateMonitorResponse,
    MigrationRuntimeState,
    MigrationState,
    PropolisMigrationState,
    SledVmmState,
    VmmRuntimeState,
    VmmState,
)

_PROPOLIS_TO_VMM: dict[InstanceState, VmmState] = {
    InstanceState.CREATING: VmmState.STARTING,
    InstanceState.STARTING: VmmState.STARTING,
    InstanceState.RUNNING: VmmState.RUNNING,
    # Propolis never uses Repairing; treat it defensively as running (as omicron does).
    InstanceState.REPAIRING: VmmState.RUNNING,
    InstanceState.STOPPING: VmmState.STOPPING,
    # Stopped-but-not-destroyed cannot be restarted yet, so it is still stopping;
    # the VMM is logically gone only once Propolis reports Destroyed.
    InstanceState.STOPPED: VmmState.STOPPING,
    InstanceState.REBOOTING: VmmState.REBOOTING,
    InstanceState.MIGRATING: VmmState.MIGRATING,
    InstanceState.FAILED: VmmState.FAILED,
    InstanceState.DESTROYED: VmmState.DESTROYED,
}


def vmm_state_of(state: InstanceState) -> VmmState:
    """Map a Propolis instance state to the VMM state Nexus is told."""
    return _PROPOLIS_TO_VMM[state]


def next_gen(gen: int) -> int:
    """``gen + 1``; ``GenerationExhausted`` past the u64 range (never wraps, never sent)."""
    if gen >= U64_MAX:
        raise GenerationExhausted(f"generation {gen} cannot be advanced: it is the u64 maximum")
    return gen + 1


def migration_state_of(state: PropolisMigrationState) -> MigrationState:
    if state is PropolisMigrationState.ERROR:
        return MigrationState.FAILED
    if state is PropolisMigrationState.FINISH:
        return MigrationState.COMPLETED
    return MigrationState.IN_PROGRESS


@attrs.frozen
class Observation:
    """What one Propolis state-monitor answer tells, at the time it arrived."""

    vmm_state: VmmState
    time: dt.datetime
    migration_in: tuple[uuid.UUID, MigrationState] | None = None
    migration_out: tuple[uuid.UUID, MigrationState] | None = None

    @classmethod
    def from_monitor(cls, resp: InstanceStateMonitorResponse, now: dt.datetime) -> Observation:
        def mig(m: InstanceMigrationStatus | None) -> tuple[uuid.UUID, MigrationState] | None:
            return None if m is None else (m.id, migration_state_of(m.state))

        return cls(
            vmm_state=vmm_state_of(resp.state),
            time=now,
            migration_in=mig(resp.migration.migration_in),
            migration_out=mig(resp.migration.migration_out),
        )


def _transition_migration(
    current: MigrationRuntimeState | None,
    observed: tuple[uuid.UUID, MigrationState],
    now: dt.datetime,
) -> MigrationRuntimeState:
    mig_id, state = observed
    if current is None:
        # Nexus creates the migration record at generation 1; an observed one is ahead.
        return MigrationRuntimeState(gen=2, migration_id=mig_id, state=state, time_updated=now)
    if current.migration_id == mig_id and current.state is state:
        return current  # no spurious update
    gen = next_gen(current.gen) if current.migration_id == mig_id else 2
    return MigrationRuntimeState(gen=gen, migration_id=mig_id, state=state, time_updated=now)


def _fail_if_active(
    m: MigrationRuntimeState | None, now: dt.datetime
) -> MigrationRuntimeState | None:
    if m is None or m.state.is_terminal:
        return m
    return attrs.evolve(m, gen=next_gen(m.gen), state=MigrationState.FAILED, time_updated=now)


def initial_state(
    vmm: VmmRuntimeState, migration_id: uuid.UUID | None, now: dt.datetime
) -> SledVmmState:
    """The state of a VMM just registered; a migration id makes it a migration target."""
    migration_in = (
        None
        if migration_id is None
        else MigrationRuntimeState(
            gen=1, migration_id=migration_id, state=MigrationState.PENDING, time_updated=now
        )
    )
    return SledVmmState(vmm_state=vmm, migration_in=migration_in)


def apply_observation(current: SledVmmState, obs: Observation) -> SledVmmState:
    """The state after an observation: generation + 1 and migrations tracked, or
    ``current`` itself when the observation changes nothing Nexus is told."""
    mig_in, mig_out = current.migration_in, current.migration_out
    if obs.migration_in is not None:
        mig_in = _transition_migration(mig_in, obs.migration_in, obs.time)
    if obs.migration_out is not None:
        mig_out = _transition_migration(mig_out, obs.migration_out, obs.time)
    if obs.vmm_state.is_halted:
        # A VMM that vanished mid-migration failed that migration.
        mig_in = _fail_if_active(mig_in, obs.time)
        mig_out = _fail_if_active(mig_out, obs.time)
    if (
        obs.vmm_state is current.vmm_state.state
        and mig_in == current.migration_in
        and mig_out == current.migration_out
    ):
        return current
    vmm = VmmRuntimeState(gen=next_gen(current.gen), state=obs.vmm_state, time_updated=obs.time)
    return SledVmmState(vmm_state=vmm, migration_in=mig_in, migration_out=mig_out)


def transition(current: SledVmmState, state: VmmState, now: dt.datetime) -> SledVmmState:
    """Force the VMM into ``state`` (a stop or reboot the agent asked for, or a forced
    terminal state); migrations are untouched unless the state is terminal. Forcing the
    state it is already in changes nothing (``current`` is returned)."""
    return apply_observation(current, Observation(vmm_state=state, time=now))
