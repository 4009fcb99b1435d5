"""sledagent: a host agent for VMs that publishes a halt at once and reaps zones apart.

The public API is what this module names; everything in ``sledagent._*`` may change.
"""

from ._agent import Host as Host
from ._agent import SledAgent as SledAgent
from ._agent import open_sled_agent as open_sled_agent
from ._api import build_app as build_app
from ._archive import TarArchiver as TarArchiver
from ._archive_procs import ProcessArchiver as ProcessArchiver
from ._bundle_store import DiskBundleStore as DiskBundleStore
from ._bundler import BundlerStatistics as BundlerStatistics
from ._bundler import ZoneBundler as ZoneBundler
from ._clients import HttpNexusClient as HttpNexusClient
from ._clients import HttpPropolisClient as HttpPropolisClient
from ._clients import HttpPropolisConnector as HttpPropolisConnector
from ._config import AgentConfig as AgentConfig
from ._config import BackoffPolicy as BackoffPolicy
from ._config import TerminationPolicy as TerminationPolicy
from ._daemon import ConfigError as ConfigError
from ._daemon import DaemonConfig as DaemonConfig
from ._daemon import DaemonInfo as DaemonInfo
from ._daemon import config_from_toml as config_from_toml
from ._daemon import load_config as load_config
from ._daemon import run_daemon as run_daemon
from ._errors import AgentError as AgentError
from ._errors import BadRequest as BadRequest
from ._errors import ChannelFull as ChannelFull
from ._errors import HostFull as HostFull
from ._errors import NicsStillHeld as NicsStillHeld
from ._errors import NoSuchBundleJob as NoSuchBundleJob
from ._errors import NoSuchVmm as NoSuchVmm
from ._errors import NoSuchZone as NoSuchZone
from ._errors import PeerError as PeerError
from ._errors import PropolisAlreadyRegistered as PropolisAlreadyRegistered
from ._errors import PropolisGone as PropolisGone
from ._errors import Terminating as Terminating
from ._errors import Unavailable as Unavailable
from ._errors import VmNotRunning as VmNotRunning
from ._host import ArchiveJob as ArchiveJob
from ._host import Archiver as Archiver
from ._host import BundleInfo as BundleInfo
from ._host import BundleStore as BundleStore
from ._host import CommandOutput as CommandOutput
from ._host import DefunctZone as DefunctZone
from ._host import LogSource as LogSource
from ._host import NexusClient as NexusClient
from ._host import PropolisClient as PropolisClient
from ._host import PropolisConnector as PropolisConnector
from ._host import Snapshot as Snapshot
from ._host import StoreStatistics as StoreStatistics
from ._host import Zone as Zone
from ._host import ZoneBackend as ZoneBackend
from ._host import ZoneCommand as ZoneCommand
from ._host import ZoneSpec as ZoneSpec
from ._host import zone_name_for as zone_name_for
from ._illumos import IllumosConfig as IllumosConfig
from ._illumos import IllumosZoneBackend as IllumosZoneBackend
from ._jobs import BundleJob as BundleJob
from ._jobs import BundleJobs as BundleJobs
from ._jobs import BundleJobState as BundleJobState
from ._local_zones import LocalZoneBackend as LocalZoneBackend
from ._local_zones import LocalZonesConfig as LocalZonesConfig
from ._manager import InstanceManager as InstanceManager
from ._notifier import NexusNotifier as NexusNotifier
from ._notifier import NotifierStatistics as NotifierStatistics
from ._openapi import openapi_document as openapi_document
from ._reaper import Reaper as Reaper
from ._reaper import ReaperItem as ReaperItem
from ._reaper import ReaperStep as ReaperStep
from ._registry import VmmPhase as VmmPhase
from ._server import serve_api as serve_api
from ._store import BundleIndex as BundleIndex
from ._store import MemoryBundleStore as MemoryBundleStore
from ._wire import Error as Error
from ._wire import InstanceEnsureBody as InstanceEnsureBody
from ._wire import InstanceState as InstanceState
from ._wire import InstanceStateMonitorResponse as InstanceStateMonitorResponse
from ._wire import InstanceStateRequested as InstanceStateRequested
from ._wire import MigrationRuntimeState as MigrationRuntimeState
from ._wire import MigrationState as MigrationState
from ._wire import QuarantinedFile as QuarantinedFile
from ._wire import SledVmmState as SledVmmState
from ._wire import VmmPutStateBody as VmmPutStateBody
from ._wire import VmmPutStateResponse as VmmPutStateResponse
from ._wire import VmmRuntimeState as VmmRuntimeState
from ._wire import VmmState as VmmState
from ._wire import VmmStateRequested as VmmStateRequested
from ._wire import VmmStateRequestedType as VmmStateRequestedType
from ._wire import VmmUnregisterResponse as VmmUnregisterResponse
from ._wire import ZoneBundleCause as ZoneBundleCause
from ._wire import ZoneBundleId as ZoneBundleId
from ._wire import ZoneBundleMetadata as ZoneBundleMetadata

__all__ = [
    "AgentConfig",
    "AgentError",
    "ArchiveJob",
    "Archiver",
    "BackoffPolicy",
    "BadRequest",
    "BundleIndex",
    "BundleInfo",
    "BundleJob",
    "BundleJobState",
    "BundleJobs",
    "BundleStore",
    "BundlerStatistics",
    "ChannelFull",
    "CommandOutput",
    "ConfigError",
    "DaemonConfig",
    "DaemonInfo",
    "DefunctZone",
    "DiskBundleStore",
    "Error",
    "Host",
    "HostFull",
    "HttpNexusClient",
    "HttpPropolisClient",
    "HttpPropolisConnector",
    "IllumosConfig",
    "IllumosZoneBackend",
    "InstanceEnsureBody",
    "InstanceManager",
    "InstanceState",
    "InstanceStateMonitorResponse",
    "InstanceStateRequested",
    "LocalZoneBackend",
    "LocalZonesConfig",
    "LogSource",
    "MemoryBundleStore",
    "MigrationRuntimeState",
    "MigrationState",
    "NexusClient",
    "NexusNotifier",
    "NicsStillHeld",
    "NoSuchBundleJob",
    "NoSuchVmm",
    "NoSuchZone",
    "NotifierStatistics",
    "PeerError",
    "ProcessArchiver",
    "PropolisAlreadyRegistered",
    "PropolisClient",
    "PropolisConnector",
    "PropolisGone",
    "QuarantinedFile",
    "Reaper",
    "ReaperItem",
    "ReaperStep",
    "SledAgent",
    "SledVmmState",
    "Snapshot",
    "StoreStatistics",
    "TarArchiver",
    "Terminating",
    "TerminationPolicy",
    "Unavailable",
    "VmNotRunning",
    "VmmPhase",
    "VmmPutStateBody",
    "VmmPutStateResponse",
    "VmmRuntimeState",
    "VmmState",
    "VmmStateRequested",
    "VmmStateRequestedType",
    "VmmUnregisterResponse",
    "Zone",
    "ZoneBackend",
    "ZoneBundleCause",
    "ZoneBundleId",
    "ZoneBundleMetadata",
    "ZoneBundler",
    "ZoneCommand",
    "ZoneSpec",
    "build_app",
    "config_from_toml",
    "load_config",
    "open_sled_agent",
    "openapi_document",
    "run_daemon",
    "serve_api",
    "zone_name_for",
]
