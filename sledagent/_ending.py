"""How the agent ends a VMM on its own: the stop grace, a migration target's source
deadline, and an end during a migration (``RunnerEnding``, a part of ``InstanceRunner``).

The stop grace (``stop_grace_s``, omicron's 10 minutes) forces ``destroyed``; a target
whose source never answered within ``migration_source_timeout_s`` is ``failed``
(docs/design.md, "Live migration"). Each timer runs once in the runner's nursery and is
cancelled when the VMM halts. ``end_vmm`` is ``terminate`` with one more step when a
migration is active: the VMM's Propolis is stopped first, so that it cannot finish the
migration behind the agent's back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from ._migration import migration_active, migration_pending
from ._requests import OneShotTimer, RunnerContext
from ._wire import SledVmmState, VmmState, utcnow

if TYPE_CHECKING:
    import structlog

    from ._host import Zone
    from ._registry import VmmEntry


class RunnerEnding:
    """The runner's deadlines and forced ends (mixed into ``InstanceRunner``)."""

    entry: VmmEntry
    _ctx: RunnerContext
    _zone: Zone | None
    _halted: bool
    _nursery: trio.Nursery | None
    _log: structlog.typing.FilteringBoundLogger
    _stop_grace: OneShotTimer
    _source_deadline: OneShotTimer

    def terminate(self, force: VmmState | None = None) -> SledVmmState:
        raise NotImplementedError

    def _journal_mark(self, **facts: object) -> None:
        raise NotImplementedError

    async def end_vmm(self, force: VmmState) -> SledVmmState:
        """``terminate(force)``; if a migration is active, only once the VMM's Propolis is
        stopped (``stop_vmm``, within ``command_timeout_s``): a target the agent declares
        failed must not complete the migration afterwards (the source would hand the
        guest to a VMM Nexus was told had failed), nor a failed source hand it over.
        omicron removes the zone before it returns (``fail_vmm_and_terminate``)."""
        zone = self._zone
        if zone is not None and not self._halted and migration_active(self.entry.state):
            with trio.move_on_after(self._ctx.config.command_timeout_s):
                try:
                    await self._ctx.backend.stop_vmm(zone)
                    self._log.info("vmm_stopped_mid_migration", zone_name=zone.name)
                except Exception as exc:  # the zone is reaped (halted) anyway
                    self._log.warning("vmm_stop_failed", error=repr(exc))
        return self.terminate(force=force)

    def _start_stop_timer(self) -> None:
        # Started by the first stop only: repeated stops do not reset the clock.
        if not self._stop_grace.started:
            self._journal_mark(stop_requested_at=utcnow())
        self.resume_stop_grace(self._ctx.config.stop_grace_s)

    def resume_stop_grace(self, remaining_s: float) -> None:
        """Run the stop grace timer for ``remaining_s`` (a re-adopted VMM whose stop was
        asked for before the restart resumes it where it was)."""

        def expired() -> None:
            self._log.warning("stop_grace_expired", grace_s=self._ctx.config.stop_grace_s)
            # destroyed, not failed: a failed VMM might be restarted by Nexus although
            # the user asked for it to stop (omicron's reasoning).
            self.terminate(force=VmmState.DESTROYED)

        assert self._nursery is not None
        self._stop_grace.start(self._nursery, remaining_s, expired)

    def resume_source_deadline(self, remaining_s: float) -> None:
        """A migration target fails if its Propolis has not reported the migration under
        way (its source answered) within ``remaining_s`` (``migration_source_timeout_s``;
        docs/design.md, "Live migration"). Nothing to watch once it has."""
        if not migration_pending(self.entry.state):
            return

        nursery = self._nursery
        assert nursery is not None

        def expired() -> None:
            if self._halted or not migration_pending(self.entry.state):
                return
            self._log.warning(
                "migration_source_silent", timeout_s=self._ctx.config.migration_source_timeout_s
            )
            # failed, and migration_in failed (generation + 1)
            nursery.start_soon(self.end_vmm, VmmState.FAILED)

        self._source_deadline.start(nursery, remaining_s, expired)
