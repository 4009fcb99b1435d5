"""The seams between the agent and the host: zones, Propolis, Nexus, archive, store.

The core (manager, runners, monitor, notifier, reaper, bundler) speaks only these
protocols. ``sledagent.testing`` implements them with scriptable fakes; the local and
illumos zone backends and the HTTP clients implement them for real. The value types
here (``Zone``, ``DefunctZone``, ``Snapshot``...) are what crosses those seams.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from typing import Protocol

import attrs
import trio

from ._wire import (
    BundleUtilization,
    CleanupContext,
    CleanupContextUpdate,
    CleanupCount,
    InstanceEnsureRequest,
    InstanceGetResponse,
    InstanceStateMonitorResponse,
    InstanceStateRequested,
    QuarantinedFile,
    SledVmmState,
    ZoneBundleCause,
    ZoneBundleMetadata,
)

ZONE_PREFIX = "oxz_propolis-server_"


def zone_name_for(propolis_id: uuid.UUID) -> str:
    """omicron's zone name for a VMM's zone."""
    return f"{ZONE_PREFIX}{propolis_id}"


def propolis_id_in(zone_name: str) -> uuid.UUID | None:
    """The VMM a Propolis zone's name carries (``zone_name_for``), or None."""
    if not zone_name.startswith(ZONE_PREFIX):
        return None
    try:
        return uuid.UUID(zone_name.removeprefix(ZONE_PREFIX))
    except ValueError:
        return None


@attrs.frozen
class ZoneSpec:
    """What a runner asks the backend to install for its VMM."""

    propolis_id: uuid.UUID
    instance_id: uuid.UUID
    propolis_addr: str
    nic_ids: frozenset[uuid.UUID] = frozenset()

    @property
    def zone_name(self) -> str:
        return zone_name_for(self.propolis_id)


@attrs.frozen
class Zone:
    """An installed zone; ``propolis_addr`` is where its Propolis serves. ``running``:
    whether the zone is booted, when the backend's listing says (illumos: ``zoneadm
    list``'s state); ``None``: not known."""

    name: str
    propolis_id: uuid.UUID | None
    propolis_addr: str
    nic_ids: frozenset[uuid.UUID] = frozenset()
    running: bool | None = None


@attrs.frozen
class DefunctZone:
    """A zone whose VMM has halted: the reaper owns it from the moment it is sent."""

    zone: Zone
    cause: ZoneBundleCause
    time_defunct: dt.datetime


@attrs.frozen
class ZoneCommand:
    """A diagnostic command about a zone: an argument list, never a shell string.

    ``name`` is its entry in the bundle: the tool's name for a zone-wide command,
    ``<tool>.<pid>`` for a per-process one (omicron's naming)."""

    argv: tuple[str, ...]
    name: str = attrs.field()

    @name.default
    def _default_name(self) -> str:
        return self.argv[0].rsplit("/", 1)[-1]


@attrs.frozen
class CommandOutput:
    """The result of one command; a timeout or a missing tool is recorded, not raised."""

    name: str
    argv: tuple[str, ...]
    output: bytes
    exit_status: int | None
    duration_s: float
    timed_out: bool = False
    error: str | None = None


@attrs.frozen
class LogSource:
    """A file in a snapshot, to be archived under ``name``: its bytes ``[start, size)``.

    ``size`` is the file's length when the snapshot was taken: a live log linked into the
    snapshot may grow afterwards, and only what it held at phase 1 is archived. ``start``
    leaves out a live log's older bytes beyond the snapshot's cap."""

    name: str
    path: str
    size: int
    start: int = 0


@attrs.frozen
class Snapshot:
    """A per-bundle, point-in-time copy of a zone's log sources (named by bundle id).

    ``missing`` names the log sources the zone should have had but did not (its
    Propolis service log, when no file of that name was there): the bundle's manifest
    says so, rather than a reader having to notice an absent entry."""

    name: str
    zone_name: str
    bundle_id: uuid.UUID
    files: tuple[LogSource, ...] = ()
    missing: tuple[str, ...] = ()


@attrs.frozen
class ArchiveJob:
    """Everything phase 2 needs; it no longer needs the zone itself."""

    metadata: ZoneBundleMetadata
    commands: tuple[CommandOutput, ...]
    snapshot: Snapshot


@attrs.frozen
class BundleInfo:
    """A finished bundle as the store indexes it: metadata, size and its copies."""

    metadata: ZoneBundleMetadata
    size: int
    paths: tuple[str, ...] = ()

    @property
    def zone_name(self) -> str:
        return self.metadata.id.zone_name

    @property
    def bundle_id(self) -> uuid.UUID:
        return self.metadata.id.bundle_id


class ZoneBackend(Protocol):
    """Zones on this host. Every method is idempotent where the docstring says so."""

    async def install(self, spec: ZoneSpec) -> Zone:
        """Create the zone and start its Propolis. On failure nothing is left behind."""
        ...

    async def zone_exists(self, zone: Zone) -> bool: ...

    async def list_zones(self) -> list[Zone]:
        """Every VMM zone on this host (the startup sweep hands them to the reaper)."""
        ...

    async def leftover_snapshots(self) -> list[Snapshot]:
        """Every bundle snapshot a crash left behind (found by its tag), with its files:
        the startup sweep archives each (its zone may be gone) and then destroys it."""
        ...

    async def bundle_commands(self, zone: Zone) -> Sequence[ZoneCommand]:
        """The zone-wide and per-process diagnostic commands for this zone."""
        ...

    async def run_command(self, zone: Zone, command: ZoneCommand) -> CommandOutput:
        """Run one command. Cancellation (the bundler's timeout) kills it."""
        ...

    async def snapshot(self, zone: Zone, bundle_id: uuid.UUID) -> Snapshot:
        """Take a per-bundle snapshot of the zone's log sources."""
        ...

    async def destroy_snapshot(self, snapshot: Snapshot) -> None:
        """Drop a snapshot; idempotent."""
        ...

    async def halt_and_remove(self, zone: Zone) -> None:
        """Stop the zone's processes and remove it; idempotent."""
        ...

    async def stop_vmm(self, zone: Zone) -> None:
        """Stop the zone's VMM process now, leaving the zone (and its logs, for the
        bundle) to ``halt_and_remove``: a VMM the agent ends while its Propolis may still
        be migrating must not finish that migration behind the agent's back. Idempotent;
        a VMM already gone is not an error."""
        ...


class PropolisClient(Protocol):
    """Drives one Propolis. Errors are ``PeerError``; ``PropolisGone`` when it has no VM."""

    async def ensure(self, request: InstanceEnsureRequest) -> None: ...

    async def instance(self) -> InstanceGetResponse:
        """``GET /instance``: the VM this Propolis runs (``PropolisGone`` if none)."""
        ...

    async def put_state(self, requested: InstanceStateRequested) -> None: ...

    async def state_monitor(self, gen: int) -> InstanceStateMonitorResponse:
        """Long-poll: answers once Propolis's generation reaches ``gen``."""
        ...


class PropolisConnector(Protocol):
    def client_for(self, zone: Zone) -> PropolisClient: ...

    def forget(self, zone: Zone) -> None:
        """The zone is defunct: release what talking to its Propolis held. Never blocks."""
        ...


class NexusClient(Protocol):
    async def put_vmm_state(self, propolis_id: uuid.UUID, state: SledVmmState) -> None:
        """Report a VMM's state; returns on acknowledgement, raises ``PeerError``."""
        ...


class Archiver(Protocol):
    async def write(self, job: ArchiveJob) -> BundleInfo:
        """Write the bundle, all or nothing: on failure no file is left behind."""
        ...

    async def sweep_partial(self) -> int:
        """Remove temporary bundle files a crash left behind; how many."""
        ...


@attrs.frozen
class StoreStatistics:
    """The bundle store's quarantine, per debug directory, as of its last scan (start,
    cleanup, a utilization or quarantine request) or move; and the moves since start."""

    quarantine_files: dict[str, int] = attrs.field(factory=dict)
    quarantine_bytes: dict[str, int] = attrs.field(factory=dict)
    quarantined: int = 0
    #: Directories under a debug directory that cannot be listed (size unknown).
    unreadable_dirs: dict[str, int] = attrs.field(factory=dict)
    #: Stale temporary bundle files removed by scans since start.
    stale_temp_files_removed: int = 0


class BundleStore(Protocol):
    """The bundles on this host. Never waits for a bundle in progress."""

    async def open(self) -> None:
        """Load the index (from the files, for an on-disk store); called at startup."""
        ...

    async def run_periodic_cleanup(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Apply the retention policy periodically until cancelled (started by the agent)."""
        ...

    async def add(self, info: BundleInfo) -> None: ...

    async def list_all(self, zone_filter: str | None = None) -> list[BundleInfo]:
        """All bundles whose zone name contains ``zone_filter``, oldest first."""
        ...

    async def list_zone(self, zone_name: str) -> list[BundleInfo]: ...

    async def get(self, zone_name: str, bundle_id: uuid.UUID) -> BundleInfo | None: ...

    async def get_verified(self, zone_name: str, bundle_id: uuid.UUID) -> BundleInfo | None:
        """The bundle with only its copies that are whole now (checked before serving);
        a copy that is not is quarantined. ``None`` if there is no such bundle;
        ``NotFound`` naming the reason if no copy is whole (they are in quarantine)."""
        ...

    async def delete(self, zone_name: str, bundle_id: uuid.UUID) -> bool:
        """Remove every copy; ``False`` if there was no such bundle."""
        ...

    def cleanup_context(self) -> CleanupContext: ...

    async def update_context(self, update: CleanupContextUpdate) -> CleanupContext:
        """Validate (``BadRequest`` naming the field), persist and apply at once."""
        ...

    async def utilization(self) -> dict[str, BundleUtilization]:
        """Per debug directory: quota, bytes available to bundles, bytes used."""
        ...

    async def cleanup(self) -> dict[str, CleanupCount]:
        """Apply retention now; per debug directory, what was removed (quarantined files
        first: their bytes count in ``bytes``, not in ``bundles``)."""
        ...

    async def quarantine(self) -> list[QuarantinedFile]:
        """Scan the debug directories, then list what is in quarantine (oldest first)."""
        ...

    def statistics(self) -> StoreStatistics: ...
