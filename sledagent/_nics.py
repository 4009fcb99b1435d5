"""NIC reservations: which zone holds which guest NIC (an OPTE port on illumos).

A new incarnation of an instance reuses its NIC ids. In omicron, creating the port
while the old zone still holds it fails (or panics); here the new zone waits, with a
deadline, for the reaper to release the old zone's NICs when it halts that zone.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable

import trio

from ._errors import NicsStillHeld


class NicReservations:
    def __init__(self) -> None:
        self._owner: dict[uuid.UUID, str] = {}
        self._released = trio.Event()

    def holder(self, nic_id: uuid.UUID) -> str | None:
        return self._owner.get(nic_id)

    def _blocking(self, nic_ids: Iterable[uuid.UUID], zone_name: str) -> list[uuid.UUID]:
        return [n for n in nic_ids if self._owner.get(n, zone_name) != zone_name]

    async def acquire(
        self, nic_ids: frozenset[uuid.UUID], zone_name: str, timeout_s: float
    ) -> None:
        """Reserve ``nic_ids`` for ``zone_name``, waiting up to ``timeout_s`` for other
        zones to release them. Raises ``NicsStillHeld`` (a 503) on timeout."""
        with trio.move_on_after(timeout_s):
            while self._blocking(nic_ids, zone_name):
                await self._released.wait()
            for nic in nic_ids:
                self._owner[nic] = zone_name
            return
        blocking = self._blocking(nic_ids, zone_name)
        holders = sorted({self._owner[n] for n in blocking})
        raise NicsStillHeld(
            f"NICs {sorted(str(n) for n in blocking)} are still held by {', '.join(holders)} "
            f"after {timeout_s:g} s; retry once that zone has been torn down"
        )

    def claim(self, nic_ids: Iterable[uuid.UUID], zone_name: str) -> None:
        """Record that ``zone_name`` holds ``nic_ids`` now (a zone re-adopted after a
        restart holds its ports already; nothing to wait for)."""
        for nic in nic_ids:
            self._owner[nic] = zone_name

    def release(self, zone_name: str) -> None:
        """Release every NIC held by ``zone_name`` and wake whoever waits; idempotent."""
        freed = [n for n, owner in self._owner.items() if owner == zone_name]
        for nic in freed:
            del self._owner[nic]
        if freed:
            self._released.set()
            self._released = trio.Event()
