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
from pathlib import Path

import attrs
import structlog
import trio

from ._agent import Host, SledAgent, open_sled_agent
from ._api import build_app
from ._archive import TarArchiver
from ._archive_procs import ProcessArchiver
from ._bundle_store import DiskBundleStore
from ._clients import HttpNexusClient, HttpPropolisConnector
from ._daemon_config import ConfigError as ConfigError
from ._daemon_config import DaemonConfig as DaemonConfig
from ._daemon_config import config_from_toml as config_from_toml
from ._daemon_config import load_config as load_config
from ._failures import ListenError
from ._h1client import H1Pool
from ._host import ZoneBackend
from ._http import ASGIApp
from ._illumos import IllumosConfig, IllumosZoneBackend, require_tools
from ._journal import StateJournal
from ._local_zones import LocalZoneBackend, LocalZonesConfig, PropolisLauncher
from ._preflight import listen_reason, prepare_host
from ._server import serve_api
from .sim._fleet import SimPropolisFleet
from .sim._host import RemoteFleetLauncher
from .sim._nexus import recording_nexus_app
from .testing._nexus import FakeNexus

log = structlog.get_logger("sledagent.daemon")
TOKEN_ENV = "SLEDAGENT_TOKEN"


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


async def _start_server(
    nursery: trio.Nursery, app: ASGIApp, listen: str, shutdown: trio.Event
) -> str:
    """Serve ``app`` in ``nursery``; its URL. A failure to bind is ``ListenError``."""
    try:
        binds = await nursery.start(
            lambda task_status: serve_api(
                app,
                listen=listen,
                shutdown=shutdown,
                task_status=task_status,
            )
        )
    except OSError as exc:  # raised before serving: nothing else to unwind
        raise ListenError(listen, listen_reason(exc)) from None
    return str(binds[0])


@attrs.frozen
class DaemonInfo:
    api_url: str
    nexus_url: str
    agent: SledAgent
    fleet: SimPropolisFleet | None
    recording_nexus: FakeNexus | None


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
    await trio.to_thread.run_sync(prepare_host, config)  # before anything touches the host
    async with trio.open_nursery() as nursery:
        servers_stop = trio.Event()
        recording: FakeNexus | None = None
        nexus_url = config.nexus_url
        if nexus_url is None:
            recording = FakeNexus()
            nexus_app = recording_nexus_app(recording)
            nexus_url = await _start_server(nursery, nexus_app, config.nexus_listen, servers_stop)
        fleet = (
            SimPropolisFleet(listen=config.sim_propolis_listen)
            if config.propolis == "sim"
            else None
        )
        if fleet is not None:
            await nursery.start(fleet.run)
        launcher: PropolisLauncher | None = fleet
        if config.propolis == "remote":
            if not config.sim_fleet_url:
                raise ConfigError('propolis = "remote" needs sim_fleet_url')
            try:
                remote = RemoteFleetLauncher(config.sim_fleet_url)
            except ValueError as exc:
                raise ConfigError(f"sim_fleet_url: {exc}") from None
            await nursery.start(remote.run)
            launcher = remote
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
                journal=StateJournal(config.data_dir / "terminal-states.jsonl"),
            )
            async with open_sled_agent(config.agent, host) as agent:
                api_stop = trio.Event()
                api_app = build_app(agent, token=token)
                api_url = await _start_server(nursery, api_app, config.listen, api_stop)
                log.info(
                    "daemon_listening", api=api_url, nexus=nexus_url, data_dir=str(config.data_dir)
                )
                _freeze_startup_heap()
                task_status.started(DaemonInfo(api_url, nexus_url, agent, fleet, recording))
                await shutdown.wait()
                log.info("daemon_stopping")
                api_stop.set()
            # Leaving the agent drained its reaper and notifier (shielded, bounded).
        finally:
            with trio.CancelScope(shield=True):
                await nexus_pool.aclose()
                if isinstance(archiver, ProcessArchiver):
                    await archiver.aclose()
        servers_stop.set()
        nursery.cancel_scope.cancel()
    log.info("daemon_stopped")
