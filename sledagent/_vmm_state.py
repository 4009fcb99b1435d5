"""Pure state logic of one VMM: Propolis observations in, ``SledVmmState`` out.

No I/O and no clock of its own (callers pass ``now``), so every rule here is tested
directly (``tests/test_vmm_state.py``). The rules are omicron's
(``sled-agent/src/common/instance.rs``): every observation bumps the VMM generation; a
halted VMM fails any migration still in flight; a stop or reboot the agent asks for is
published at once as ``stopping``/``rebooting``.
"""

from __future__ import annotations

import datetime as dt
import uuid

import attrs

from ._wire import (
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
    gen = current.gen + 1 if current.migration_id == mig_id else 2
    return MigrationRuntimeState(gen=gen, migration_id=mig_id, state=state, time_updated=now)


def _fail_if_active(
    m: MigrationRuntimeState | None, now: dt.datetime
) -> MigrationRuntimeState | None:
    if m is None or m.state.is_terminal:
        return m
    return attrs.evolve(m, gen=m.gen + 1, state=MigrationState.FAILED, time_updated=now)


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
    """The state after an observation: generation + 1, migrations tracked."""
    vmm = VmmRuntimeState(gen=current.gen + 1, state=obs.vmm_state, time_updated=obs.time)
    mig_in, mig_out = current.migration_in, current.migration_out
    if obs.migration_in is not None:
        mig_in = _transition_migration(mig_in, obs.migration_in, obs.time)
    if obs.migration_out is not None:
        mig_out = _transition_migration(mig_out, obs.migration_out, obs.time)
    if vmm.state.is_halted:
        # A VMM that vanished mid-migration failed that migration.
        mig_in = _fail_if_active(mig_in, obs.time)
        mig_out = _fail_if_active(mig_out, obs.time)
    return SledVmmState(vmm_state=vmm, migration_in=mig_in, migration_out=mig_out)


def transition(current: SledVmmState, state: VmmState, now: dt.datetime) -> SledVmmState:
    """Force the VMM into ``state`` (a stop or reboot the agent asked for, or a forced
    terminal state); migrations are untouched unless the state is terminal."""
    return apply_observation(current, Observation(vmm_state=state, time=now))
