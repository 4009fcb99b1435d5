"""The bundle index: what bundles exist, answered without opening any of them.

``BundleIndex`` is pure (no I/O) and is what every store keeps in memory. The
``MemoryBundleStore`` is a complete ``BundleStore`` over it, for hosts whose archiver keeps
bundles elsewhere (the test fakes, benchmarks on the fake backend); the on-disk store
rebuilds the same index from its files at startup.
"""

from __future__ import annotations

import uuid

import attrs
import trio
from trio_util import AsyncValue

from ._host import BundleInfo, StoreStatistics
from ._retention import DEFAULT_CONTEXT, apply_update
from ._wire import (
    BundleUtilization,
    CleanupContext,
    CleanupContextUpdate,
    CleanupCount,
    QuarantinedFile,
)


@attrs.define
class BundleIndex:
    _bundles: dict[tuple[str, uuid.UUID], BundleInfo] = attrs.field(factory=dict)

    def add(self, info: BundleInfo) -> None:
        self._bundles[(info.zone_name, info.bundle_id)] = info

    def get(self, zone_name: str, bundle_id: uuid.UUID) -> BundleInfo | None:
        return self._bundles.get((zone_name, bundle_id))

    def remove(self, zone_name: str, bundle_id: uuid.UUID) -> BundleInfo | None:
        return self._bundles.pop((zone_name, bundle_id), None)

    def list_all(self, zone_filter: str | None = None) -> list[BundleInfo]:
        """Bundles whose zone name contains ``zone_filter``, oldest first."""
        found = [
            b
            for (zone, _), b in self._bundles.items()
            if zone_filter is None or zone_filter in zone
        ]
        return sorted(found, key=lambda b: (b.metadata.time_created, str(b.bundle_id)))

    def list_zone(self, zone_name: str) -> list[BundleInfo]:
        return [b for b in self.list_all() if b.zone_name == zone_name]

    def __len__(self) -> int:
        return len(self._bundles)

    @property
    def bytes_used(self) -> int:
        return sum(b.size for b in self._bundles.values())


class MemoryBundleStore:
    """A ``BundleStore`` that keeps only the index (no files, so nothing to reclaim)."""

    def __init__(self) -> None:
        self.index = BundleIndex()
        self.context = AsyncValue(DEFAULT_CONTEXT)

    def cleanup_context(self) -> CleanupContext:
        ctx: CleanupContext = self.context.value  # trio-util is untyped
        return ctx

    async def update_context(self, update: CleanupContextUpdate) -> CleanupContext:
        new = apply_update(self.cleanup_context(), update)
        self.context.value = new
        return new

    async def utilization(self) -> dict[str, BundleUtilization]:
        return {}

    async def cleanup(self) -> dict[str, CleanupCount]:
        return {}

    async def open(self) -> None:
        pass  # nothing persisted

    async def run_periodic_cleanup(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()  # no files, nothing to reclaim: idle until cancelled
        await trio.sleep_forever()

    async def add(self, info: BundleInfo) -> None:
        self.index.add(info)

    async def list_all(self, zone_filter: str | None = None) -> list[BundleInfo]:
        return self.index.list_all(zone_filter)

    async def list_zone(self, zone_name: str) -> list[BundleInfo]:
        return self.index.list_zone(zone_name)

    async def get(self, zone_name: str, bundle_id: uuid.UUID) -> BundleInfo | None:
        return self.index.get(zone_name, bundle_id)

    async def get_verified(self, zone_name: str, bundle_id: uuid.UUID) -> BundleInfo | None:
        return self.index.get(zone_name, bundle_id)  # no files: nothing to check

    async def delete(self, zone_name: str, bundle_id: uuid.UUID) -> bool:
        return self.index.remove(zone_name, bundle_id) is not None

    async def quarantine(self) -> list[QuarantinedFile]:
        return []

    def statistics(self) -> StoreStatistics:
        return StoreStatistics()
