"""ZoneBundler: diagnostics bundles in two bounded phases, with no global lock.

Phase 1 (the zone is held; short and bounded): run the zone-wide and per-process
commands concurrently, each under its own timeout (a timeout is recorded in the output,
the other commands are kept), then take a per-bundle snapshot of the zone's log sources.
Then the zone is *released*: ``on_released`` fires and the reaper may halt the zone while
phase 2 runs.

Phase 2 (the zone is no longer needed): write the archive from the snapshot (the real
archiver does this in a worker thread), add it to the store, and drop the snapshot under
a shielded cancel scope with its own deadline, so a cancelled bundle leaks no snapshot.

Phase 1 has its own ``trio.CapacityLimiter``, phase 2 its ``ArchiveSlots`` (more slots
for small bundles); their statistics are exported. omicron
serializes every bundle on the host, and list/get/delete/cleanup too, behind one mutex
(#5236); here listing and deleting go to the store and never wait for a bundle.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

import attrs
import structlog
import trio

from ._archive_slots import ArchiveSlots
from ._host import (
    ArchiveJob,
    Archiver,
    BundleInfo,
    BundleStore,
    CommandOutput,
    Snapshot,
    Zone,
    ZoneBackend,
    ZoneCommand,
)
from ._stats import ZONE_HELD_BUCKETS, Histogram
from ._wire import ZoneBundleCause, ZoneBundleId, ZoneBundleMetadata, utcnow

_RECOVERED_NOTE = (
    b"This bundle was archived at the agent's start from a snapshot that a crash (or a\n"
    b"kill) left behind. Its zone may no longer exist, so the diagnostic commands were\n"
    b"not run; the logs are the snapshot's, as of the original bundle's phase 1.\n"
)
log = structlog.get_logger("sledagent.bundler")

#: The bundle format version written into ``metadata.toml`` (omicron's is 0).
BUNDLE_VERSION = 0


@attrs.frozen
class LimiterStatistics:
    borrowed: int
    total: int
    waiting: int


@attrs.frozen
class BundlerStatistics:
    collect: LimiterStatistics  # phase 1: zones held
    archive: LimiterStatistics  # phase 2: archives being written
    created: int
    failed: int
    #: Seconds each finished phase 1 held its zone, newest last (bounded).
    zone_held_s: tuple[float, ...]
    #: Phase-2 slot-seconds spent writing archives, and the log bytes they took in: the
    #: rate the archive slots achieve, and (against wall time x slots) how busy they were.
    archive_busy_s: float = 0.0
    archive_input_bytes: int = 0


def _limiter_stats(limiter: trio.CapacityLimiter) -> LimiterStatistics:
    s = limiter.statistics()
    return LimiterStatistics(
        borrowed=s.borrowed_tokens, total=int(s.total_tokens), waiting=s.tasks_waiting
    )


def _input_bytes(commands: tuple[CommandOutput, ...], snapshot: Snapshot) -> int:
    """What a bundle's archive reads: its logs' bytes and its commands' outputs."""
    logs = sum(f.size - f.start for f in snapshot.files)
    return logs + sum(len(c.output) for c in commands)


class ZoneBundler:
    _HELD_SAMPLES = 4096

    def __init__(
        self,
        backend: ZoneBackend,
        archiver: Archiver,
        store: BundleStore,
        *,
        collect_concurrency: int,
        archive_concurrency: int,
        archive_max_concurrency: int | None = None,
        archive_small_bytes: int = 0,
        command_timeout_s: float,
        snapshot_cleanup_timeout_s: float,
    ) -> None:
        self._backend = backend
        self._archiver = archiver
        self.store = store
        self.collect_limiter = trio.CapacityLimiter(collect_concurrency)
        #: Phase 2: ``archive_concurrency`` bundles of any size at once, up to
        #: ``archive_max_concurrency`` while the bytes in flight fit ``archive_small_bytes``.
        self.archive_slots = ArchiveSlots(
            archive_concurrency, max_slots=archive_max_concurrency, small_bytes=archive_small_bytes
        )
        self._command_timeout_s = command_timeout_s
        self._cleanup_timeout_s = snapshot_cleanup_timeout_s
        self._created = 0
        self._failed = 0
        self._held: list[float] = []
        #: Every phase 1's duration since start (``sledagent_zone_held_seconds``).
        self.zone_held = Histogram(ZONE_HELD_BUCKETS)
        self._archive_busy_s = 0.0
        self._archive_input_bytes = 0

    def statistics(self) -> BundlerStatistics:
        return BundlerStatistics(
            collect=_limiter_stats(self.collect_limiter),
            archive=LimiterStatistics(
                borrowed=self.archive_slots.running,
                total=self.archive_slots.max_slots,
                waiting=self.archive_slots.waiting,
            ),
            created=self._created,
            failed=self._failed,
            zone_held_s=tuple(self._held),
            archive_busy_s=self._archive_busy_s,
            archive_input_bytes=self._archive_input_bytes,
        )

    async def create(
        self,
        zone: Zone,
        cause: ZoneBundleCause,
        *,
        on_released: Callable[[], None] | None = None,
        on_collecting: Callable[[], None] | None = None,
        bundle_id: uuid.UUID | None = None,
    ) -> BundleInfo:
        """Bundle ``zone``; returns the stored bundle.

        ``on_collecting`` is called when a phase-1 slot is taken. ``on_released`` is
        called once phase 1 has succeeded: from then on the zone may be halted. If
        phase 1 fails it is not called (the caller decides whether to retry while it
        still holds the zone). On any failure no bundle is stored and the
        snapshot, if one was taken, is dropped.
        """
        bundle_id = bundle_id or uuid.uuid4()
        bound = log.bind(zone_name=zone.name, bundle_id=str(bundle_id))
        metadata = ZoneBundleMetadata(
            cause=cause,
            id=ZoneBundleId(bundle_id=bundle_id, zone_name=zone.name),
            time_created=utcnow(),
            version=BUNDLE_VERSION,
        )
        try:
            commands, snapshot = await self._collect(zone, bundle_id, bound, on_collecting)
            if on_released is not None:
                on_released()
            keep_snapshot = False
            try:
                async with self.archive_slots.hold(_input_bytes(commands, snapshot)):
                    t0 = trio.current_time()
                    try:
                        info = await self._archiver.write(ArchiveJob(metadata, commands, snapshot))
                    finally:
                        self._archive_busy_s += trio.current_time() - t0
                self._archive_input_bytes += sum(f.size - f.start for f in snapshot.files)
                await self.store.add(info)
            except trio.Cancelled:
                # Shutdown in phase 2: the zone may be torn down already, and this
                # snapshot holds the only copy of its logs. It stays; the next start
                # archives it (``recover``) rather than losing the bundle.
                keep_snapshot = True
                bound.info("bundle_left_for_next_start", snapshot=snapshot.name)
                raise
            finally:
                if not keep_snapshot:
                    await self._drop_snapshot(snapshot, bound)
        except Exception as exc:
            self._failed += 1
            bound.warning("bundle_failed", error=repr(exc))
            raise
        self._created += 1
        bound.info("bundle_created", size=info.size, cause=cause.value)
        return info

    async def recover(self, snapshot: Snapshot) -> BundleInfo | None:
        """Archive a snapshot a crash left behind (phase 2 only: its zone may be gone),
        then destroy it. Cause ``other``; the commands could not be run again, which the
        bundle says in a ``recovered`` entry. None if the bundle already exists."""
        bound = log.bind(zone_name=snapshot.zone_name, bundle_id=str(snapshot.bundle_id))
        try:
            if await self.store.get(snapshot.zone_name, snapshot.bundle_id) is not None:
                return None  # archived and stored before the crash; only the drop was lost
            metadata = ZoneBundleMetadata(
                cause=ZoneBundleCause.OTHER,
                id=ZoneBundleId(bundle_id=snapshot.bundle_id, zone_name=snapshot.zone_name),
                time_created=utcnow(),
                version=BUNDLE_VERSION,
            )
            note = CommandOutput(
                "recovered", (), _RECOVERED_NOTE, None, 0.0,
                error="commands not run: archived from a snapshot a crash left behind",
            )  # fmt: skip
            async with self.archive_slots.hold(_input_bytes((note,), snapshot)):
                info = await self._archiver.write(ArchiveJob(metadata, (note,), snapshot))
            await self.store.add(info)
        except Exception as exc:
            self._failed += 1
            bound.warning("bundle_recovery_failed", error=repr(exc))
            return None
        finally:
            await self._drop_snapshot(snapshot, bound)
        self._created += 1
        bound.info("bundle_recovered", size=info.size)
        return info

    async def _collect(
        self,
        zone: Zone,
        bundle_id: uuid.UUID,
        bound: structlog.typing.FilteringBoundLogger,
        on_collecting: Callable[[], None] | None,
    ) -> tuple[tuple[CommandOutput, ...], Snapshot]:
        async with self.collect_limiter:
            if on_collecting is not None:
                on_collecting()
            t0 = trio.current_time()
            commands = await self._run_commands(zone)
            snapshot = await self._backend.snapshot(zone, bundle_id)
            held = trio.current_time() - t0
        self._held.append(held)
        self.zone_held.observe(held)
        if len(self._held) > self._HELD_SAMPLES:
            del self._held[: len(self._held) - self._HELD_SAMPLES]
        bound.info("zone_released", held_s=round(held, 4), files=len(snapshot.files))
        return commands, snapshot

    async def _run_commands(self, zone: Zone) -> tuple[CommandOutput, ...]:
        commands = list(await self._backend.bundle_commands(zone))
        results: list[CommandOutput | None] = [None] * len(commands)

        async def run_one(i: int, command: ZoneCommand) -> None:
            t0 = trio.current_time()
            out: CommandOutput | None = None
            with trio.move_on_after(self._command_timeout_s):
                try:
                    out = await self._backend.run_command(zone, command)
                except Exception as exc:  # a failed command is recorded, never fatal
                    out = CommandOutput(
                        command.name,
                        command.argv,
                        b"",
                        None,
                        trio.current_time() - t0,
                        error=repr(exc),
                    )
            if out is None:
                out = CommandOutput(
                    command.name, command.argv, b"", None, trio.current_time() - t0, timed_out=True
                )
            results[i] = out

        async with trio.open_nursery() as nursery:
            for i, command in enumerate(commands):
                nursery.start_soon(run_one, i, command)
        return tuple(r for r in results if r is not None)

    async def _drop_snapshot(
        self, snapshot: Snapshot, bound: structlog.typing.FilteringBoundLogger
    ) -> None:
        # Shielded: a cancelled bundle must still not leak its snapshot. If even this
        # fails or times out, the startup sweep finds the snapshot by its tag.
        with trio.move_on_after(self._cleanup_timeout_s, shield=True) as scope:
            try:
                await self._backend.destroy_snapshot(snapshot)
            except Exception as exc:
                bound.error("snapshot_destroy_failed", snapshot=snapshot.name, error=repr(exc))
        if scope.cancelled_caught:
            bound.error("snapshot_destroy_timeout", snapshot=snapshot.name)
