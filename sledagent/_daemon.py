"""The daemon: the agent on the embedded default, served over HTTP.

Embedded default: local zones under ``data_dir``, each with a simulated Propolis served
in this process (``propolis = "sim"``; ``"external"`` attaches to the address each VMM is
registered with), tar.gz bundles in ``data_dir/debug``, and, with no ``nexus_url``, a
recording Nexus in this process. Configuration is one TOML file, validated at start
(unknown keys and bad values are refused with the key's name); flags override it.

Shutdown (``shutdown`` set, e.g. by SIGINT/SIGTERM): the API stops accepting, the agent
drains its reaper and notifier within ``shutdown_drain_s`` under a shielded scope, then
everything is cancelled; zones left behind are swept by the next start.
"""

from __future__ import annotations

import gc
import os
import tomllib
import uuid
from pathlib import Path
from typing import Any, Literal

import attrs
import structlog
import trio

from ._agent import Host, SledAgent, open_sled_agent
from ._api import build_app
from ._archive import TarArchiver
from ._archive_procs import ProcessArchiver
from ._bundle_store import DiskBundleStore
from ._clients import HttpNexusClient, HttpPropolisConnector
from ._config import AgentConfig, BackoffPolicy
from ._datadir import StartupError, hold_data_dir, host_rebooted, sled_id_of
from ._h1client import H1Pool
from ._host import ZoneBackend
from ._illumos import IllumosConfig, IllumosZoneBackend, require_tools
from ._journal import StateJournal
from ._local_zones import LocalZoneBackend, LocalZonesConfig, PropolisLauncher
from ._server import DEFAULT_LISTEN, serve_api
from .sim._fleet import SimPropolisFleet
from .sim._host import RemoteFleetLauncher
from .sim._nexus import recording_nexus_app
from .sim._spawn import (
    RemoteNexusView,
    SimHost,
    SimHostError,
    attach_sim_host,
    renew_lease,
)
from .testing._nexus import FakeNexus

log = structlog.get_logger("sledagent.daemon")
TOKEN_ENV = "SLEDAGENT_TOKEN"
#: The write-ahead journal in the data directory (SQLite).
JOURNAL_NAME = "journal.sqlite3"


class ConfigError(ValueError):
    """The configuration file or flags are invalid; the message names the key."""


@attrs.frozen(kw_only=True)
class DaemonConfig:
    listen: str = DEFAULT_LISTEN
    data_dir: Path = attrs.field(default=Path("sledagent-data"), converter=Path)
    #: Nexus's base URL; unset: a recording Nexus runs in this process.
    nexus_url: str | None = None
    #: Bearer token required by every route but /metrics (also from $SLEDAGENT_TOKEN).
    token: str | None = None
    #: ``sim``: a simulated Propolis per zone, in a ``sledagent sim`` process of its own
    #: that outlives the agent (found again at the next start; it also runs the recording
    #: Nexus when ``nexus_url`` is unset); ``sim-inprocess``: the same in this process (they
    #: die with it; benchmarks); ``remote``: launched by the ``sledagent sim`` process at
    #: ``sim_fleet_url``; ``external``: already listening at each VMM's registered address.
    propolis: Literal["sim", "sim-inprocess", "remote", "external"] = "sim"
    #: ``local``: zones as directory trees under data_dir (any host); ``illumos``: real
    #: zones, SMF and ZFS (needs zoneadm, zonecfg, zlogin, zfs; Propolis is external).
    backend: Literal["local", "illumos"] = "local"
    #: illumos: where zones live and their parent dataset.
    zone_root: Path = attrs.field(default=Path("/zone"), converter=Path)
    zone_dataset: str = "rpool/zone"
    #: illumos: the dataset of the debug directories; its ZFS quota (``zfs list -Hpo
    #: quota,avail``) is the bundle quota unless ``bundle_quota_bytes`` is set.
    debug_dataset: str | None = None
    sim_fleet_url: str | None = None
    #: Debug directories for bundles (one per M.2 on a real sled); default data_dir/debug.
    debug_dirs: tuple[Path, ...] = ()
    bundle_quota_bytes: int | None = None
    max_bundle_file_mb: int = 64
    #: Where bundles are compressed: ``process`` (worker processes, one per phase-2 slot,
    #: off the agent's GIL) or ``thread`` (worker threads of the agent's process).
    archive_in: Literal["process", "thread"] = "process"
    #: Each zone's log writer (bytes/s) and the log volume seeded at zone install.
    log_rate_bps: int = 2048
    seed_log_mb: float = 0.0
    #: Where seeded logs are generated once and hard-linked from (benchmarks).
    seed_cache: Path | None = attrs.field(default=None, converter=attrs.converters.optional(Path))
    agent: AgentConfig = attrs.field(factory=AgentConfig)

    def __attrs_post_init__(self) -> None:
        if self.propolis == "remote" and not self.sim_fleet_url:
            raise ConfigError('propolis = "remote" needs sim_fleet_url')
        if self.archive_in not in ("process", "thread"):
            raise ConfigError(f'archive_in must be "process" or "thread", not {self.archive_in!r}')
        if self.backend not in ("local", "illumos"):
            raise ConfigError(f'backend must be "local" or "illumos", not {self.backend!r}')
        if self.backend == "illumos" and self.propolis != "external":
            raise ConfigError(
                'backend = "illumos" runs each zone\'s own Propolis: set propolis = "external"'
            )

    def bundle_dirs(self) -> list[Path]:
        return list(self.debug_dirs) or [self.data_dir / "debug"]


def _checked(table: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(
            f"unknown config key{'s' if len(unknown) > 1 else ''} in {where}: {unknown}"
        )


def config_from_toml(text: str, *, source: str = "config") -> DaemonConfig:
    """Parse and validate a TOML config (see docs/operations.md for every key)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    top = {f.name for f in attrs.fields(DaemonConfig)}
    _checked(doc, top, source)
    agent_table = doc.pop("agent", {})
    if not isinstance(agent_table, dict):
        raise ConfigError(f"{source}: [agent] must be a table")
    _checked(agent_table, {f.name for f in attrs.fields(AgentConfig)}, f"{source} [agent]")
    try:
        for key in ("nexus_backoff", "monitor_backoff", "reaper_backoff"):
            if key in agent_table:
                agent_table[key] = BackoffPolicy(**agent_table[key])
        agent = AgentConfig(**agent_table)
        if "debug_dirs" in doc:
            doc["debug_dirs"] = tuple(Path(d) for d in doc["debug_dirs"])
        return DaemonConfig(agent=agent, **doc)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: {exc}") from None


def load_config(path: Path) -> DaemonConfig:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from None
    return config_from_toml(text, source=str(path))


def archiver_for(config: DaemonConfig, dirs: list[Path]) -> TarArchiver | ProcessArchiver:
    """The configured archiver; as many worker processes as phase-2 slots."""
    level, cap = config.agent.compression_level, config.max_bundle_file_mb << 20
    if config.archive_in == "thread":
        return TarArchiver(dirs, compression_level=level, max_file_bytes=cap)
    return ProcessArchiver(
        dirs,
        compression_level=level,
        max_file_bytes=cap,
        workers=config.agent.bundle_archive_concurrency,
    )


def _freeze_startup_heap() -> None:
    """Move what start-up allocated (modules, the app, replayed state) out of the cyclic
    garbage collector's sight: a full collection pauses the trio thread for as long as it
    takes to walk every tracked object, and these never become garbage. Collect first,
    so that nothing already unreachable is kept forever."""
    gc.collect()
    gc.freeze()


@attrs.frozen
class DaemonInfo:
    api_url: str
    nexus_url: str
    agent: SledAgent
    #: The in-process simulated fleet (``propolis = "sim-inprocess"``).
    fleet: SimPropolisFleet | None
    #: What the recording Nexus received: in this process, or in the sim host.
    recording_nexus: FakeNexus | RemoteNexusView | None
    #: The ``sledagent sim`` process that runs the simulated guests (``propolis = "sim"``).
    sim_host: SimHost | None = None


async def run_daemon(
    config: DaemonConfig,
    shutdown: trio.Event,
    *,
    task_status: trio.TaskStatus[DaemonInfo] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the daemon until ``shutdown`` is set; reports where it listens."""
    token = config.token or os.environ.get(TOKEN_ENV) or None
    if config.backend == "illumos":
        try:
            require_tools()
        except RuntimeError as exc:
            raise ConfigError(str(exc)) from None
    async with trio.open_nursery() as nursery:
        servers_stop = trio.Event()
        async with hold_data_dir(config.data_dir):
            # Once the data directory is ours: a second agent on it is refused in one line.
            log.info("daemon_starting", pid=os.getpid(), data_dir=str(config.data_dir))
            sled_id = await trio.to_thread.run_sync(sled_id_of, config.data_dir)
            rebooted = await trio.to_thread.run_sync(host_rebooted, config.data_dir)
            peers = await _peers(config, nursery, servers_stop)
            await _serve_agent(
                config, nursery, peers, sled_id, rebooted, token, shutdown, task_status
            )
        servers_stop.set()
        nursery.cancel_scope.cancel()
    log.info("daemon_stopped")


@attrs.frozen
class _Peers:
    nexus_url: str
    recording: FakeNexus | RemoteNexusView | None
    fleet: SimPropolisFleet | None
    launcher: PropolisLauncher | None
    sim_host: SimHost | None


async def _peers(config: DaemonConfig, nursery: trio.Nursery, stop: trio.Event) -> _Peers:
    """Nexus and the Propolis launcher, simulated where the config says so.

    ``sim`` (the default): the simulated fleet, and with no ``nexus_url`` the recording
    Nexus, run in a ``sledagent sim`` process that outlives this one (``sim/_spawn.py``),
    found again at the next start: a restart of the agent costs no simulated guest.
    ``sim-inprocess``: the same peers inside this process (benchmarks that read the
    guests' clock directly); they die with it."""
    recording: FakeNexus | RemoteNexusView | None = None
    nexus_url = config.nexus_url
    fleet: SimPropolisFleet | None = None
    launcher: PropolisLauncher | None = None
    sim_host: SimHost | None = None
    if config.propolis == "sim":
        try:
            sim_host = await attach_sim_host(config.data_dir)
        except SimHostError as exc:
            raise StartupError(str(exc)) from None
        nursery.start_soon(renew_lease, sim_host)
        if nexus_url is None:
            nexus_url = sim_host.nexus_url
            recording = RemoteNexusView(nexus_url)
        remote = RemoteFleetLauncher(sim_host.fleet_url)
        await nursery.start(remote.run)
        launcher = remote
    elif config.propolis == "sim-inprocess":
        fleet = SimPropolisFleet()
        await nursery.start(fleet.run)
        launcher = fleet
    elif config.propolis == "remote":
        if not config.sim_fleet_url:
            raise ConfigError('propolis = "remote" needs sim_fleet_url')
        try:
            remote = RemoteFleetLauncher(config.sim_fleet_url)
        except ValueError as exc:
            raise ConfigError(f"sim_fleet_url: {exc}") from None
        await nursery.start(remote.run)
        launcher = remote
    if nexus_url is None:
        in_process = FakeNexus()
        binds = await nursery.start(
            lambda task_status: serve_api(
                recording_nexus_app(in_process),
                listen="127.0.0.1:0",
                shutdown=stop,
                task_status=task_status,
            )
        )
        nexus_url, recording = str(binds[0]), in_process
    return _Peers(nexus_url, recording, fleet, launcher, sim_host)


async def _serve_agent(
    config: DaemonConfig,
    nursery: trio.Nursery,
    peers: _Peers,
    sled_id: uuid.UUID,
    rebooted: bool,
    token: str | None,
    shutdown: trio.Event,
    task_status: trio.TaskStatus[DaemonInfo],
) -> None:
    """The agent on ``peers``, served over HTTP until ``shutdown``."""
    nexus_url, launcher = peers.nexus_url, peers.launcher
    connector = HttpPropolisConnector()
    await nursery.start(connector.run)
    # As many connections, kept alive, as deliveries the notifier may have in flight.
    deliveries = config.agent.nexus_concurrency
    try:
        nexus_pool = H1Pool(nexus_url, max_connections=deliveries, max_idle=deliveries)
    except ValueError as exc:
        raise ConfigError(f"nexus_url: {exc}") from None
    dirs = config.bundle_dirs()
    archiver = archiver_for(config, dirs)
    if isinstance(archiver, ProcessArchiver):
        nursery.start_soon(archiver.warm_up)
    try:
        zones: ZoneBackend
        quota = config.bundle_quota_bytes
        if config.backend == "illumos":
            illumos = IllumosZoneBackend(
                IllumosConfig(zone_root=config.zone_root, zone_dataset=config.zone_dataset)
            )
            if quota is None and config.debug_dataset:
                zfs_quota, avail = await illumos.quota(config.debug_dataset)
                quota = zfs_quota or avail  # no quota set: what is free now
            zones = illumos
        else:
            zones = LocalZoneBackend(
                LocalZonesConfig(
                    root=config.data_dir,
                    log_rate_bps=config.log_rate_bps,
                    seed_log_bytes=int(config.seed_log_mb * (1 << 20)),
                    seed_cache=config.seed_cache,
                ),
                launcher=launcher,
            )
        host = Host(
            backend=zones,
            connector=connector,
            nexus=HttpNexusClient(nexus_pool),
            archiver=archiver,
            store=DiskBundleStore(
                dirs,
                context_path=config.data_dir / "bundle-cleanup-context.toml",
                quota_bytes=quota,
            ),
            journal=StateJournal(config.data_dir / JOURNAL_NAME),
        )
        async with open_sled_agent(
            config.agent, host, sled_id=sled_id, host_rebooted=rebooted
        ) as agent:
            api_stop = trio.Event()
            binds = await nursery.start(
                lambda task_status: serve_api(
                    build_app(agent, token=token),
                    listen=config.listen,
                    shutdown=api_stop,
                    task_status=task_status,
                )
            )
            api_url = str(binds[0])
            log.info(
                "daemon_listening", api=api_url, nexus=nexus_url, data_dir=str(config.data_dir)
            )
            _freeze_startup_heap()
            task_status.started(
                DaemonInfo(api_url, nexus_url, agent, peers.fleet, peers.recording, peers.sim_host)
            )
            await shutdown.wait()
            log.info("daemon_stopping")
            api_stop.set()
        # Leaving the agent drained its reaper and notifier (shielded, bounded).
    finally:
        with trio.CancelScope(shield=True):
            await nexus_pool.aclose()
            if isinstance(peers.recording, RemoteNexusView):
                await peers.recording.aclose()  # its kept-alive sockets to the sim host
            if isinstance(archiver, ProcessArchiver):
                await archiver.aclose()
