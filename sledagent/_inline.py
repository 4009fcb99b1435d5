"""The inline termination policy: omicron's behaviour, kept as a measured baseline.

Not for production. It exists so ``sledagent bench mass-stop --policy both`` can compare,
in one run, what omicron does with what the reaper does:
- the runner bundles its zone and halts it on its own task, and publishes the terminal
  state only afterwards (omicron #5237: Nexus times out, a clean stop becomes Failed);
- every bundle on the host, and listing/get/delete, take one lock (omicron #5236).
"""

from __future__ import annotations

import uuid

import structlog
import trio

from ._backoff import retry
from ._bundler import ZoneBundler
from ._config import BackoffPolicy
from ._host import BundleInfo, BundleStore, StoreStatistics, Zone, ZoneBackend
from ._nics import NicReservations
from ._wire import (
    BundleUtilization,
    CleanupContext,
    CleanupContextUpdate,
    CleanupCount,
    QuarantinedFile,
    ZoneBundleCause,
)


class InlineTeardown:
    def __init__(
        self,
        backend: ZoneBackend,
        bundler: ZoneBundler,
        nics: NicReservations,
        lock: trio.Lock,
        backoff: BackoffPolicy,
    ) -> None:
        self._backend = backend
        self._bundler = bundler
        self._nics = nics
        self._lock = lock
        self._backoff = backoff

    async def teardown(self, zone: Zone, log: structlog.typing.FilteringBoundLogger) -> None:
        """Bundle under the host-wide lock, then halt; on the runner's own task."""
        async with self._lock:
            try:
                await self._bundler.create(zone, ZoneBundleCause.TERMINATED_INSTANCE)
            except Exception as exc:
                log.warning("inline_bundle_failed", error=repr(exc))
        await retry(
            lambda: self._backend.halt_and_remove(zone),
            backoff=self._backoff,
            attempts=None,
            log=log,
            event="inline_halt_retry",
        )
        self._nics.release(zone.name)


class LockedBundleStore:
    """A store whose every operation takes the host-wide bundle lock (omicron's mutex)."""

    def __init__(self, inner: BundleStore, lock: trio.Lock) -> None:
        self._inner = inner
        self._lock = lock

    async def open(self) -> None:
        await self._inner.open()

    async def run_periodic_cleanup(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        await self._inner.run_periodic_cleanup(task_status=task_status)

    async def add(self, info: BundleInfo) -> None:
        # Called by the bundler while the lock is already held by the inline teardown.
        await self._inner.add(info)

    async def list_all(self, zone_filter: str | None = None) -> list[BundleInfo]:
        async with self._lock:
            return await self._inner.list_all(zone_filter)

    async def list_zone(self, zone_name: str) -> list[BundleInfo]:
        async with self._lock:
            return await self._inner.list_zone(zone_name)

    async def get(self, zone_name: str, bundle_id: uuid.UUID) -> BundleInfo | None:
        async with self._lock:
            return await self._inner.get(zone_name, bundle_id)

    async def get_verified(self, zone_name: str, bundle_id: uuid.UUID) -> BundleInfo | None:
        async with self._lock:
            return await self._inner.get_verified(zone_name, bundle_id)

    async def delete(self, zone_name: str, bundle_id: uuid.UUID) -> bool:
        async with self._lock:
            return await self._inner.delete(zone_name, bundle_id)

    async def quarantine(self) -> list[QuarantinedFile]:
        async with self._lock:
            return await self._inner.quarantine()

    def statistics(self) -> StoreStatistics:
        return self._inner.statistics()

    def cleanup_context(self) -> CleanupContext:
        return self._inner.cleanup_context()

    async def update_context(self, update: CleanupContextUpdate) -> CleanupContext:
        async with self._lock:
            return await self._inner.update_context(update)

    async def utilization(self) -> dict[str, BundleUtilization]:
        async with self._lock:
            return await self._inner.utilization()

    async def cleanup(self) -> dict[str, CleanupCount]:
        async with self._lock:
            return await self._inner.cleanup()
