"""FakeZones: a ``ZoneBackend`` with controllable durations, volumes and failures.

It records what a user of the host would see: when each zone was installed, when its
bundle released it (snapshot taken), when it was halted, when its archive was written,
which snapshots are still alive, and the peak number of zones being collected, of
archives being written and of zones being halted at once. Durations are ``trio.sleep``s,
so everything is deterministic under ``trio.testing.MockClock``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence

import attrs
import trio

from .._host import (
    ArchiveJob,
    BundleInfo,
    CommandOutput,
    LogSource,
    Snapshot,
    Zone,
    ZoneCommand,
    ZoneSpec,
)


class InjectedFault(Exception):
    """A failure the test asked for."""


@attrs.define
class ZoneTimeline:
    installed_at: float
    released_at: list[float] = attrs.field(factory=list)  # one per bundle's phase 1
    archived_at: list[float] = attrs.field(factory=list)
    halted_at: float | None = None
    halt_attempts: int = 0


class FakeZones:
    def __init__(
        self,
        *,
        command_s: float = 0.0,
        commands: int = 4,
        copy_s: float = 0.0,
        log_bytes: int = 1 << 20,
        log_files: int = 4,
        halt_s: float = 0.0,
        install_s: float = 0.0,
    ) -> None:
        for name, value in (("command_s", command_s), ("copy_s", copy_s), ("halt_s", halt_s)):
            if value < 0:
                raise ValueError(f"FakeZones `{name}` must be >= 0, got {value}")
        if commands < 0 or log_bytes < 0 or log_files < 1:
            raise ValueError("FakeZones needs commands >= 0, log_bytes >= 0, log_files >= 1")
        self.command_s = command_s
        self.commands = commands
        self.copy_s = copy_s
        self.log_bytes = log_bytes
        self.log_files = log_files
        self.halt_s = halt_s
        self.install_s = install_s
        self.zones: dict[str, Zone] = {}
        self.timeline: dict[str, ZoneTimeline] = {}
        self.live_snapshots: set[str] = set()
        self._snapshots: dict[str, Snapshot] = {}  # by name: what a crash would leave
        self.hanging_commands: set[str] = set()  # argv[0]s that never finish
        self.fail_install = 0
        self.fail_snapshot = 0
        self.fail_archive = 0
        self.fail_halt = 0
        self.fail_destroy_snapshot = 0
        #: How long destroying a snapshot takes (``inf``: it never returns).
        self.destroy_snapshot_s = 0.0
        self.archived_jobs: list[ArchiveJob] = []  # what phase 2 was given, in order
        self.collecting: set[str] = set()
        self.archiving = 0
        self.peak_collecting = 0
        self.peak_archiving = 0
        self.halting = 0
        self.peak_halting = 0
        #: Called with a zone whose VMM is stopped or torn down (its Propolis dies).
        self.on_vmm_gone: Callable[[Zone], None] | None = None
        #: Zones whose VMM the agent stopped before reaping them (``stop_vmm``).
        self.vmm_stopped: set[str] = set()

    # --- ZoneBackend --------------------------------------------------------------------

    async def install(self, spec: ZoneSpec) -> Zone:
        await trio.sleep(self.install_s)  # cancelled here: nothing was created
        if self.fail_install > 0:
            self.fail_install -= 1
            raise InjectedFault("zone install failed")
        zone = Zone(spec.zone_name, spec.propolis_id, spec.propolis_addr, spec.nic_ids)
        self.zones[zone.name] = zone
        self.timeline[zone.name] = ZoneTimeline(installed_at=trio.current_time())
        return zone

    async def zone_exists(self, zone: Zone) -> bool:
        await trio.lowlevel.checkpoint()
        return zone.name in self.zones

    async def list_zones(self) -> list[Zone]:
        await trio.lowlevel.checkpoint()
        return list(self.zones.values())

    async def leftover_snapshots(self) -> list[Snapshot]:
        await trio.lowlevel.checkpoint()
        return [self._snapshots[name] for name in sorted(self.live_snapshots)]

    async def bundle_commands(self, zone: Zone) -> Sequence[ZoneCommand]:
        await trio.lowlevel.checkpoint()
        self.collecting.add(zone.name)
        self.peak_collecting = max(self.peak_collecting, len(self.collecting))
        names = ["ps", "uptime", "ss", "who", "last", "pargs", "pfiles", "pstack"]
        return [ZoneCommand((names[i % len(names)], zone.name)) for i in range(self.commands)]

    async def run_command(self, zone: Zone, command: ZoneCommand) -> CommandOutput:
        if command.argv[0] in self.hanging_commands:
            await trio.sleep_forever()
        await trio.sleep(self.command_s)
        return CommandOutput(
            command.name, command.argv, f"{command.argv}: ok\n".encode(), 0, self.command_s
        )

    async def snapshot(self, zone: Zone, bundle_id: uuid.UUID) -> Snapshot:
        try:
            await trio.lowlevel.checkpoint()
            if self.fail_snapshot > 0:
                self.fail_snapshot -= 1
                raise InjectedFault("snapshot failed")
            size = self.log_bytes // max(1, self.log_files)
            files = tuple(
                LogSource(f"propolis.log.{i}", f"/fake/{zone.name}/propolis.log.{i}", size)
                for i in range(self.log_files)
            )
            snapshot = Snapshot(f"{zone.name}@{bundle_id}", zone.name, bundle_id, files)
            self.live_snapshots.add(snapshot.name)
            self._snapshots[snapshot.name] = snapshot
            self.timeline[zone.name].released_at.append(trio.current_time())
            return snapshot
        finally:
            self.collecting.discard(zone.name)

    async def destroy_snapshot(self, snapshot: Snapshot) -> None:
        await trio.sleep(self.destroy_snapshot_s)
        if self.fail_destroy_snapshot > 0:
            self.fail_destroy_snapshot -= 1
            raise InjectedFault("snapshot destroy failed")
        self.live_snapshots.discard(snapshot.name)
        self._snapshots.pop(snapshot.name, None)

    async def halt_and_remove(self, zone: Zone) -> None:
        timeline = self.timeline.get(zone.name)
        if timeline is not None:
            timeline.halt_attempts += 1
        self.halting += 1
        self.peak_halting = max(self.peak_halting, self.halting)
        try:
            await trio.sleep(self.halt_s)
        finally:
            self.halting -= 1
        if self.fail_halt > 0:
            self.fail_halt -= 1
            raise InjectedFault("zone halt failed")
        if self.zones.pop(zone.name, None) is not None:
            if timeline is not None:
                timeline.halted_at = trio.current_time()
            if self.on_vmm_gone is not None:
                self.on_vmm_gone(zone)

    async def stop_vmm(self, zone: Zone) -> None:
        await trio.lowlevel.checkpoint()
        self.vmm_stopped.add(zone.name)
        if self.on_vmm_gone is not None:
            self.on_vmm_gone(zone)

    # --- the archiver that goes with it -------------------------------------------------

    def archiver(self) -> FakeArchiver:
        return FakeArchiver(self)


class FakeArchiver:
    """An ``Archiver`` that takes ``copy_s`` and produces no file."""

    def __init__(self, zones: FakeZones) -> None:
        self._zones = zones

    async def sweep_partial(self) -> int:
        await trio.lowlevel.checkpoint()
        return 0  # writes no files

    async def write(self, job: ArchiveJob) -> BundleInfo:
        zones = self._zones
        zones.archiving += 1
        zones.peak_archiving = max(zones.peak_archiving, zones.archiving)
        try:
            await trio.sleep(zones.copy_s)
            if zones.fail_archive > 0:
                zones.fail_archive -= 1
                raise InjectedFault("archive write failed")
        finally:
            zones.archiving -= 1
        zones.archived_jobs.append(job)
        name = job.metadata.id.zone_name
        if name in zones.timeline:
            zones.timeline[name].archived_at.append(trio.current_time())
        size = sum(f.size for f in job.snapshot.files) + sum(len(c.output) for c in job.commands)
        return BundleInfo(job.metadata, size)
