"""What a recording Nexus checks of the protocol: per VMM and per migration.

Nexus keeps one record per VMM and one per migration, and writes a sled's report into it
only when its generation is newer (``vmm_and_migration_update_runtime``); its
``instance_update`` saga then reads both sides of a migration: either side ``failed``
means the migration failed (the instance stays where it was), either side
``completed`` means it moved (``UpdatesRequired::for_instance``). An agent that sends
an older generation after a newer one, or two contents under one generation, or ends
the two sides inconsistently, breaks what that saga relies on. The ledger records every
acknowledged report and names each such break (``problems``), so a test or a benchmark
can assert there is none:

- per VMM: generations never go back; one generation, one content;
- per side of a migration (``migration_in`` from the target, ``migration_out`` from
  the source): the same, and its state never leaves a terminal state nor goes back to
  ``pending``; one VMM per side;
- the ends: both ``completed`` (the guest moved), or the target ``failed`` (the source
  then ``failed`` too, or never heard of it). A source that completed with a target that
  failed lost the guest; a target that completed with a source that failed ran it twice
  at once (as far as Nexus can tell).
"""

from __future__ import annotations

import uuid
from typing import Any

import attrs

from .._wire import MigrationRuntimeState, MigrationState, SledVmmState

_ORDER = {
    MigrationState.PENDING: 0,
    MigrationState.IN_PROGRESS: 1,
    MigrationState.COMPLETED: 2,
    MigrationState.FAILED: 2,
}


@attrs.frozen
class SideReport:
    """One acknowledged report of one side of a migration."""

    time: float
    propolis_id: uuid.UUID
    gen: int
    state: MigrationState

    def as_dict(self) -> dict[str, Any]:
        return {
            "time": self.time,
            "propolis_id": str(self.propolis_id),
            "gen": self.gen,
            "state": self.state.value,
        }


@attrs.define
class MigrationRecord:
    """Both sides of one migration, as Nexus received them."""

    migration_id: uuid.UUID
    target: list[SideReport] = attrs.Factory(list)  # migration_in reports
    source: list[SideReport] = attrs.Factory(list)  # migration_out reports
    problems: list[str] = attrs.Factory(list)

    @property
    def target_state(self) -> MigrationState | None:
        return self.target[-1].state if self.target else None

    @property
    def source_state(self) -> MigrationState | None:
        return self.source[-1].state if self.source else None

    @property
    def outcome(self) -> str:
        """``completed`` (both sides), ``failed`` (the target failed, and the source
        failed or never reported), ``inconsistent`` or ``in_progress``."""
        t, s = self.target_state, self.source_state
        if t is MigrationState.COMPLETED and s is MigrationState.COMPLETED:
            return "completed"
        if (t, s) in (
            (MigrationState.FAILED, MigrationState.COMPLETED),
            (MigrationState.COMPLETED, MigrationState.FAILED),
        ):
            return "inconsistent"
        if t is MigrationState.FAILED and (s is None or s is MigrationState.FAILED):
            return "failed"
        return "in_progress"

    def first_time(self, side: str, state: MigrationState) -> float | None:
        reports = self.target if side == "target" else self.source
        return next((r.time for r in reports if r.state is state), None)

    @property
    def completed_at(self) -> float | None:
        """When Nexus had ``completed`` from both sides (the later of the two)."""
        t = self.first_time("target", MigrationState.COMPLETED)
        s = self.first_time("source", MigrationState.COMPLETED)
        return None if t is None or s is None else max(t, s)

    def as_dict(self) -> dict[str, Any]:
        return {
            "migration_id": str(self.migration_id),
            "target_propolis_id": str(self.target[0].propolis_id) if self.target else None,
            "source_propolis_id": str(self.source[0].propolis_id) if self.source else None,
            "outcome": self.outcome,
            "completed_at": self.completed_at,
            "target": [r.as_dict() for r in self.target],
            "source": [r.as_dict() for r in self.source],
            "problems": list(self.problems),
        }


class MigrationLedger:
    """Checks every acknowledged ``SledVmmState`` (``observe``); see the module doc."""

    def __init__(self) -> None:
        self.migrations: dict[uuid.UUID, MigrationRecord] = {}
        #: Breaks of the per-VMM rules (a generation that went back...).
        self.vmm_problems: list[str] = []
        self._vmm_last: dict[uuid.UUID, SledVmmState] = {}

    @property
    def problems(self) -> list[str]:
        """Every break found so far, VMMs' and migrations'."""
        found = list(self.vmm_problems)
        for record in self.migrations.values():
            found += [f"migration {record.migration_id}: {p}" for p in record.problems]
            if record.outcome == "inconsistent":
                found.append(
                    f"migration {record.migration_id}: inconsistent ends (target "
                    f"{record.target_state}, source {record.source_state})"
                )
        return found

    def observe(self, time: float, propolis_id: uuid.UUID, state: SledVmmState) -> None:
        last = self._vmm_last.get(propolis_id)
        if last is not None:
            if state.gen < last.gen:
                self.vmm_problems.append(
                    f"VMM {propolis_id}: generation {state.gen} after {last.gen}"
                )
            elif state.gen == last.gen and state != last:
                self.vmm_problems.append(
                    f"VMM {propolis_id}: generation {state.gen} sent with two contents"
                )
        if last is None or state.gen >= last.gen:
            self._vmm_last[propolis_id] = state
        if state.migration_in is not None:
            self._side(time, propolis_id, state.migration_in, "target")
        if state.migration_out is not None:
            self._side(time, propolis_id, state.migration_out, "source")

    def _side(
        self, time: float, propolis_id: uuid.UUID, m: MigrationRuntimeState, side: str
    ) -> None:
        record = self.migrations.get(m.migration_id)
        if record is None:
            record = self.migrations[m.migration_id] = MigrationRecord(m.migration_id)
        reports = record.target if side == "target" else record.source
        report = SideReport(time, propolis_id, m.gen, m.state)
        if reports:
            last = reports[-1]
            if last.propolis_id != propolis_id:
                record.problems.append(
                    f"{side} reported by two VMMs: {last.propolis_id} and {propolis_id}"
                )
            elif m.gen < last.gen:
                record.problems.append(f"{side} generation {m.gen} after {last.gen}")
                return
            elif m.gen == last.gen:
                if m.state is not last.state:
                    record.problems.append(
                        f"{side} generation {m.gen} sent as {last.state} and as {m.state}"
                    )
                return  # a repeat (delivery is at least once): nothing new
            elif last.state.is_terminal and m.state is not last.state:
                record.problems.append(f"{side} left {last.state} for {m.state}")
            elif _ORDER[m.state] < _ORDER[last.state]:
                record.problems.append(f"{side} went back from {last.state} to {m.state}")
        reports.append(report)


def migration_ended(record: MigrationRecord, both_sides: bool = True) -> bool:
    """The migration has an outcome; with ``both_sides``, its source (if it reported at
    all) has ended too: a target can fail before its source learns of it."""
    if record.outcome == "in_progress":
        return False
    source = record.source_state
    return not both_sides or source is None or source.is_terminal
