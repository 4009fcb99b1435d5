"""Wire models: what the agent speaks, field for field as in ``contracts/``.

Three documents define them: the sled-agent API we serve (``sled-agent.json``), the
Nexus call we make (``nexus-internal.json``) and the Propolis API we drive
(``propolis-server.json``). Every class here is an attrs class that msgspec encodes and
decodes strictly (see ``_codec``); field names are the contract's, so a model and its
schema can be compared mechanically (``tests/test_wire.py`` does).

Bodies we accept but do not interpret (the VMM spec, the sled-local network config)
are kept as raw JSON values: we must accept the whole body, and only use what the agent
needs (the NIC ids, which tie a VMM to resources a new incarnation may be waiting for).
"""

from __future__ import annotations

import datetime as dt
import enum
import ipaddress
import uuid
from typing import Annotated, Any

import attrs
import msgspec

#: The largest u64: generations and sizes are ``format: uint64`` in the contracts.
U64_MAX = 2**64 - 1
U8 = Annotated[int, msgspec.Meta(ge=0, le=255)]
U32 = Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)]
#: msgspec's bounds stop at int64 and it decodes any JSON integer, so the upper bound of
#: a u64 is an attrs validator on each field (``u64``), which msgspec runs on decode: a
#: generation of 2^64 is a 400 naming the field, never echoed or sent on to Nexus.
U64 = Annotated[int, msgspec.Meta(ge=0, extra_json_schema={"format": "uint64"})]
#: A u64 generation number (``Generation`` in the contracts).
Generation = U64


def u64(_: object, attribute: attrs.Attribute[int], value: int) -> None:
    """attrs validator of a u64 field: the upper bound (checked on construction and decode)."""
    if value > U64_MAX:
        raise ValueError(f"`{attribute.name}` must be a u64 (at most {U64_MAX}), got {value}")


def is_socket_addr(value: str) -> bool:
    """``ip:port`` or ``[ipv6]:port``, the port 0..65535 (``socket_addr``)."""
    host, sep, port = value.rpartition(":")
    if not (sep and port.isascii() and port.isdigit() and int(port) <= 65535):
        return False
    try:
        if host.startswith("[") and host.endswith("]"):
            ipaddress.IPv6Address(host[1:-1])
        else:
            ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


def socket_addr(_: object, attribute: attrs.Attribute[str], value: str) -> None:
    """attrs validator of a ``SocketAddr`` field (Rust's, as omicron types it): an IP
    literal and a port, ``127.0.0.1:12400`` or ``[fd00::1]:12400``. A host name, a URL or
    a port past 65535 is refused at registration (400 naming the field) rather than
    failing later at every request to that Propolis, or at the next start."""
    if not is_socket_addr(value):
        raise ValueError(
            f"`{attribute.name}` must be an IP address and port (127.0.0.1:12400 or "
            f"[fd00::1]:12400), got {value[:100]!r}"
        )


#: An RFC 3339 timestamp with its offset (chrono's ``DateTime<Utc>`` in the contracts):
#: ``tz=True`` refuses a naive one and makes the schema say ``format: date-time``.
Timestamp = Annotated[dt.datetime, msgspec.Meta(tz=True)]


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# --- sled-agent and Nexus: VMM state -------------------------------------------------


class VmmState(enum.StrEnum):
    """One of the states that a VMM can be in (``VmmState``)."""

    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    REBOOTING = "rebooting"
    MIGRATING = "migrating"
    FAILED = "failed"
    DESTROYED = "destroyed"

    @property
    def is_halted(self) -> bool:
        """Terminal: the VMM will not run again and its zone must be reaped."""
        return self in (VmmState.DESTROYED, VmmState.FAILED)


class MigrationState(enum.StrEnum):
    """The state of an instance's live migration (sled-agent ``MigrationState``)."""

    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    FAILED = "failed"
    COMPLETED = "completed"

    @property
    def is_terminal(self) -> bool:
        return self in (MigrationState.FAILED, MigrationState.COMPLETED)


@attrs.frozen
class VmmRuntimeState:
    """The dynamic runtime properties of an individual VMM process."""

    gen: Generation = attrs.field(validator=u64)
    state: VmmState
    time_updated: Timestamp


@attrs.frozen
class MigrationRuntimeState:
    """A sled's view of one migration, from the role of the VMM it is about."""

    gen: Generation = attrs.field(validator=u64)
    migration_id: uuid.UUID
    state: MigrationState
    time_updated: Timestamp


@attrs.frozen
class SledVmmState:
    """A sled's total knowledge of the state of a VMM: what Nexus is told."""

    vmm_state: VmmRuntimeState
    migration_in: MigrationRuntimeState | None = None
    migration_out: MigrationRuntimeState | None = None

    @property
    def gen(self) -> int:
        return self.vmm_state.gen


# --- sled-agent: requests and responses ----------------------------------------------


class VmmStateRequestedType(enum.StrEnum):
    MIGRATION_TARGET = "migration_target"
    RUNNING = "running"
    STOPPED = "stopped"
    REBOOT = "reboot"


@attrs.frozen
class InstanceMigrationTargetParams:
    src_propolis_addr: str = attrs.field(validator=socket_addr)


@attrs.frozen
class VmmStateRequested:
    """``{"type": ...}``, with a ``value`` only for ``migration_target``.

    The contract's tagged union is modelled as one class; ``_codec`` checks that
    ``value`` is present exactly when the type needs it and omits it otherwise.
    """

    type: VmmStateRequestedType
    value: InstanceMigrationTargetParams | None = None

    def __attrs_post_init__(self) -> None:
        needs_value = self.type is VmmStateRequestedType.MIGRATION_TARGET
        if needs_value and self.value is None:
            raise ValueError("`value` is required when `type` is `migration_target`")
        if not needs_value and self.value is not None:
            raise ValueError(f"`value` is not allowed when `type` is `{self.type.value}`")


@attrs.frozen
class VmmPutStateBody:
    state: VmmStateRequested


@attrs.frozen
class VmmPutStateResponse:
    updated_runtime: SledVmmState | None = None


@attrs.frozen
class VmmUnregisterResponse:
    updated_runtime: SledVmmState | None = None


@attrs.frozen
class InstanceMetadata:
    project_id: uuid.UUID
    silo_id: uuid.UUID


@attrs.frozen
class NetworkInterface:
    """A guest NIC; the agent uses its ``id`` (OPTE ports are keyed by it)."""

    id: uuid.UUID
    ip_config: Any
    kind: Any
    mac: str
    name: str
    primary: bool
    slot: U8
    vni: Any


@attrs.frozen
class InstanceSledLocalConfig:
    attached_subnets: list[Any]
    delegated_zvols: list[Any]
    dhcp_config: Any
    external_ips: Any
    firewall_rules: list[Any]
    hostname: Annotated[str, msgspec.Meta(min_length=1, max_length=253)]
    multicast_groups: list[Any]
    nics: list[NetworkInterface]
    primary_nic_mtu: U32 | None = None


@attrs.frozen
class InstanceEnsureBody:
    """The body of ``PUT /vmms/{propolis_id}``: register a VMM with this sled."""

    instance_id: uuid.UUID
    local_config: InstanceSledLocalConfig
    metadata: InstanceMetadata
    propolis_addr: str = attrs.field(validator=socket_addr)
    vmm_runtime: VmmRuntimeState
    vmm_spec: Any
    migration_id: uuid.UUID | None = None

    @property
    def nic_ids(self) -> frozenset[uuid.UUID]:
        return frozenset(nic.id for nic in self.local_config.nics)


@attrs.frozen
class Error:
    """Every error body: ``{message, error_code, request_id}``."""

    message: str
    request_id: str
    error_code: str | None = None


# --- Propolis ------------------------------------------------------------------------


class InstanceState(enum.StrEnum):
    """Propolis's view of its VM (``InstanceState``)."""

    CREATING = "Creating"
    STARTING = "Starting"
    RUNNING = "Running"
    STOPPING = "Stopping"
    STOPPED = "Stopped"
    REBOOTING = "Rebooting"
    MIGRATING = "Migrating"
    REPAIRING = "Repairing"
    FAILED = "Failed"
    DESTROYED = "Destroyed"


class InstanceStateRequested(enum.StrEnum):
    RUN = "Run"
    STOP = "Stop"
    REBOOT = "Reboot"


class PropolisMigrationState(enum.StrEnum):
    SYNC = "Sync"
    RAM_PUSH = "RamPush"
    PAUSE = "Pause"
    RAM_PUSH_DIRTY = "RamPushDirty"
    DEVICE = "Device"
    RESUME = "Resume"
    RAM_PULL = "RamPull"
    SERVER = "Server"
    FINISH = "Finish"
    ERROR = "Error"


@attrs.frozen
class InstanceMigrationStatus:
    id: uuid.UUID
    state: PropolisMigrationState


@attrs.frozen
class InstanceMigrateStatusResponse:
    migration_in: InstanceMigrationStatus | None = None
    migration_out: InstanceMigrationStatus | None = None


@attrs.frozen
class InstanceStateMonitorRequest:
    gen: U64 = attrs.field(validator=u64)


@attrs.frozen
class InstanceStateMonitorResponse:
    """One answer of the long-poll ``GET /instance/state-monitor``."""

    gen: U64 = attrs.field(validator=u64)
    state: InstanceState
    migration: InstanceMigrateStatusResponse = attrs.field(factory=InstanceMigrateStatusResponse)


@attrs.frozen
class PropolisInstanceMetadata:
    project_id: uuid.UUID
    silo_id: uuid.UUID
    sled_id: uuid.UUID
    sled_model: str
    sled_revision: U32
    sled_serial: str


@attrs.frozen
class InstanceProperties:
    description: str
    id: uuid.UUID
    metadata: PropolisInstanceMetadata
    name: str


@attrs.frozen
class PropolisInstance:
    """Propolis's ``Instance``: the VM it runs and its state."""

    properties: InstanceProperties
    state: InstanceState


@attrs.frozen
class InstanceGetResponse:
    """``GET /instance``."""

    instance: PropolisInstance


@attrs.frozen
class InstanceEnsureRequest:
    """``PUT /instance``: ``init`` is ``{"method": "Spec"|"MigrationTarget", ...}``."""

    init: Any
    properties: InstanceProperties


# --- sled-agent: zone bundles --------------------------------------------------------


class ZoneBundleCause(enum.StrEnum):
    """Why a bundle was made. Retention keeps higher-ranked causes longer."""

    OTHER = "other"
    UNEXPECTED_ZONE = "unexpected_zone"
    TERMINATED_INSTANCE = "terminated_instance"

    @property
    def rank(self) -> int:
        return _CAUSE_RANK[self]


_CAUSE_RANK = {
    ZoneBundleCause.OTHER: 0,
    ZoneBundleCause.UNEXPECTED_ZONE: 1,
    ZoneBundleCause.TERMINATED_INSTANCE: 2,
}


@attrs.frozen
class ZoneBundleId:
    bundle_id: uuid.UUID
    zone_name: str


@attrs.frozen
class ZoneBundleMetadata:
    cause: ZoneBundleCause
    id: ZoneBundleId
    time_created: Timestamp
    version: U8


class PriorityDimension(enum.StrEnum):
    TIME = "time"
    CAUSE = "cause"


@attrs.frozen
class Duration:
    secs: U64 = attrs.field(validator=u64)
    nanos: U32

    @property
    def seconds(self) -> float:
        return self.secs + self.nanos / 1e9


@attrs.frozen
class CleanupContext:
    """The zone bundle cleanup task's context (what ``GET .../context`` answers)."""

    period: Duration
    priority: list[PriorityDimension]
    storage_limit: U8


@attrs.frozen
class CleanupContextUpdate:
    period: Duration | None = None
    priority: list[PriorityDimension] | None = None
    storage_limit: U8 | None = None


@attrs.frozen
class CleanupCount:
    bundles: U64 = attrs.field(validator=u64)
    bytes: U64 = attrs.field(validator=u64)


@attrs.frozen
class BundleUtilization:
    bytes_available: U64 = attrs.field(validator=u64)
    bytes_used: U64 = attrs.field(validator=u64)
    dataset_quota: U64 = attrs.field(validator=u64)


# --- ours, beyond omicron (documented in the served spec) ---------------------------


@attrs.frozen
class ZoneCleanupItem:
    """A zone the reaper holds (``GET /zones/cleanup``)."""

    zone_name: str
    cause: ZoneBundleCause
    step: str
    archiving: bool
    since: Timestamp
    bundle_attempts: int
    bundle_error: str | None
    halt_attempts: int
    halt_error: str | None


@attrs.frozen
class BundleJobStatus:
    """An explicit bundle job (``POST /zones/bundles/{zone_name}``)."""

    job_id: uuid.UUID
    zone_name: str
    state: str
    time_created: Timestamp
    bundle: ZoneBundleMetadata | None = None
    error: str | None = None


@attrs.frozen
class QuarantinedFile:
    """A file found in a debug directory that is not a whole bundle (unreadable,
    truncated, misnamed, not a regular file), moved to ``<debug_dir>/.quarantine/``
    (``GET /zones/bundle-cleanup/quarantine``). Counted in the directory's
    ``bytes_used``; cleanup removes these before any bundle. A directory under a debug
    directory that cannot be listed is also listed, where it is (``path`` =
    ``original_path``), with ``bytes`` 0 (its size is unknown) and a reason saying so;
    cleanup never removes it."""

    debug_dir: str
    #: Where it is now, under ``<debug_dir>/.quarantine/``.
    path: str
    #: Where it was found.
    original_path: str
    bytes: U64
    reason: str
    time_quarantined: Timestamp
