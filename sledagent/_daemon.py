"""The daemon: the agent on the embedded default, served over HTTP.

Embedded default: local zones under ``data_dir``, each with a simulated Propolis served
by a ``sledagent sim`` process that outlives the agent (``propolis = "sim"``; its
recording Nexus too when there is no ``nexus_url``; ``"external"`` attaches to the
address each VMM is registered with), tar.gz bundles in ``data_dir/debug``.
Configuration is one TOML file, validated at start (``_daemon_config``); flags
override it.

Shutdown (``shutdown`` set, e.g. by SIGINT/SIGTERM): the API stops accepting, the agent
drains its reaper and notifier within ``shutdown_drain_s`` under a shielded scope while
the API's answers in flight finish (a bundle download: ``[http] graceful_s``, twice
with the front process: its own, then the connections it handed over), then
everything is cancelled; live VMMs, their zones and Propolis stay as they are for the
next start to take back (``_readopt``).
"""

from __future__ import annotations

import gc
import os
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import structlog
import trio

from ._admission import ReadAdmission
from ._agent import Host, SledAgent, open_sled_agent
from ._api import build_app
from ._archive import TarArchiver
from ._archive_procs import ProcessArchiver
from ._bundle_store import DiskBundleStore
from ._clients import HttpNexusClient, HttpPropolisConnector
from ._config import TerminationPolicy
from ._daemon_config import TOKEN_ENV as TOKEN_ENV
from ._daemon_config import ConfigError as ConfigError
from ._daemon_config import DaemonConfig as DaemonConfig
from ._daemon_config import api_token
from ._daemon_config import config_from_toml as config_from_toml
from ._daemon_config import load_config as load_config
from ._datadir import hold_data_dir, host_rebooted, sled_id_of
from ._failures import ListenError, StartupError
from ._front_channel import FrontSettings
from ._front_proc import FrontProcess
from ._h1client import H1Pool
from ._host import ZoneBackend
from ._http import ASGIApp
from ._illumos import IllumosConfig, IllumosZoneBackend, require_tools
from ._journal import StateJournal
from ._local_zones import LocalZoneBackend, LocalZonesConfig, PropolisLauncher
from ._log import SETTINGS as LOG_SETTINGS
from ._preflight import listen_reason, prepare_host
from ._registry import Registry
from ._server import HttpLimits, announce_serving, bind_listeners, serve_api
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
#: The write-ahead journal in the data directory (SQLite).
JOURNAL_NAME = "journal.sqlite3"


def archiver_for(config: DaemonConfig, dirs: list[Path]) -> TarArchiver | ProcessArchiver:
    """The configured archiver; as many worker processes as phase-2 slots (small
    bundles' included: ``AgentConfig.archive_max_slots``)."""
    level, cap = config.agent.compression_level, config.max_bundle_file_mb << 20
    if config.archive_in == "thread":
        return TarArchiver(dirs, compression_level=level, max_file_bytes=cap)
    return ProcessArchiver(
        dirs,
        compression_level=level,
        max_file_bytes=cap,
        workers=config.agent.archive_max_slots,
    )


def _freeze_startup_heap() -> None:
    """Move what start-up allocated (modules, the app, replayed state, re-adopted VMMs)
    out of the cyclic garbage collector's sight: a full collection pauses the process
    (the agent's thread and, through the GIL, the front thread's reads) for as long as
    it takes to walk every tracked object, and these never become garbage.

    Nothing is collected first: with 1000 VMMs taken back a ``gc.collect(1)`` here took
    197 ms and found 85 unreachable objects; the reads it stalled made the restart's
    read p99 0.24 s instead of 0.03 s (``sledagent bench restart``, docs/reliability.md).
    Those few objects stay, once per start."""
    gc.freeze()
    log.info("startup_heap_frozen", objects=gc.get_freeze_count())


#: The cyclic GC stays off at most this long while a start takes VMMs back.
_READOPTION_GC_OFF_S = 30.0


async def _after_readoption(agent: SledAgent, archiver: object) -> None:
    """Once every VMM taken back after a restart has had its Propolis's answer: freeze
    the heap and turn the cyclic GC back on, then start the bundle workers.

    Re-adopting 1000 VMMs allocates their runners, pools and connections, all
    long-lived; with the GC on, half the agent's CPU in that window went to collections
    (1.67 of 3.18 s at N=1000, two of them full) while reads waited behind them. The
    workers' start (an interpreter and the package's imports each, ~0.7 s of CPU) took
    40-60% of a core each in that window on a 2-core host (session 9); a bundle needed
    sooner starts its worker itself. Bounded: after ``_READOPTION_GC_OFF_S`` anyway."""
    try:
        with trio.move_on_after(_READOPTION_GC_OFF_S):
            await agent.readoption_done.wait()
    finally:
        _freeze_startup_heap()
        gc.enable()
    if isinstance(archiver, ProcessArchiver):
        await archiver.warm_up()


async def _start_front(config: DaemonConfig) -> FrontProcess | None:
    """The front process, spawned as early as possible (its imports overlap the
    agent's start), or None: off in the config, or the inline baseline (whose reads
    queue behind its runners, as in omicron). One that cannot start is logged and
    the agent serves the API itself."""
    if not config.http.front_process or (
        config.agent.termination_policy is TerminationPolicy.INLINE
    ):
        return None
    try:
        return await FrontProcess.start()
    except OSError as exc:
        log.error("http_front_failed", error=str(exc), action="the agent serves the API itself")
        return None


async def _start_server(
    nursery: trio.Nursery,
    app: ASGIApp,
    listen: str,
    shutdown: trio.Event,
    *,
    limits: HttpLimits | None = None,
    announce: bool = True,
    front: bool = False,
    front_until: trio.Event | None = None,
    front_process: FrontProcess | None = None,
    registry: Registry | None = None,
    settings: FrontSettings | None = None,
    done: trio.Event | None = None,
) -> str:
    """Serve ``app`` in ``nursery``; its URL. A failure to bind is ``ListenError``.
    ``front_process`` (with the ``registry`` it replicates and its ``settings``): the
    API is served through it (``_front_proc``). ``done``: set once the server has
    returned (after ``shutdown``: its answers in flight finished or were cut at the
    grace)."""
    finished = done if done is not None else trio.Event()
    if front_process is not None and registry is not None and settings is not None:
        try:
            listeners, urls = await bind_listeners(listen)
        except OSError as exc:
            raise ListenError(listen, listen_reason(exc)) from None
        if announce:
            announce_serving(listeners, settings.limits)
        admission = getattr(app, "admission", None)
        await nursery.start(
            _until_done,
            finished,
            lambda task_status: front_process.serve(
                app,
                listeners,
                registry=registry,
                settings=settings,
                shutdown=shutdown,
                admission=admission if isinstance(admission, ReadAdmission) else None,
                task_status=task_status,
            ),
        )
        return urls[0]
    try:
        binds = await nursery.start(
            _until_done,
            finished,
            lambda task_status: serve_api(
                app,
                listen=listen,
                shutdown=shutdown,
                limits=limits,
                announce=announce,
                front=front,
                front_until=front_until,
                task_status=task_status,
            ),
        )
    except OSError as exc:  # raised before serving: nothing else to unwind
        raise ListenError(listen, listen_reason(exc)) from None
    return str(binds[0])


async def _until_done(
    done: trio.Event,
    serve: Callable[[trio.TaskStatus[Any]], Awaitable[None]],
    task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
) -> None:
    try:
        await serve(task_status)
    finally:
        done.set()


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
    #: The API's state-read admission (what was served and shed, how long reads waited).
    admission: ReadAdmission | None = None
    #: The front process serving the API (``[http] front_process``), if there is one.
    front_pid: int | None = None
    #: The agent's end of it (tests: what it was told, whether changes wait for it).
    front: FrontProcess | None = None


async def run_daemon(
    config: DaemonConfig,
    shutdown: trio.Event,
    *,
    task_status: trio.TaskStatus[DaemonInfo] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the daemon until ``shutdown`` is set; reports where it listens."""
    token = api_token(config)
    if config.backend == "illumos":
        try:
            require_tools()
        except RuntimeError as exc:
            raise ConfigError(str(exc)) from None
    await trio.to_thread.run_sync(prepare_host, config)  # before anything touches the host
    async with trio.open_nursery() as nursery:
        servers_stop = trio.Event()
        async with hold_data_dir(config.data_dir):
            # Once the data directory is ours: a second agent on it is refused in one line.
            log.info("daemon_starting", pid=os.getpid(), data_dir=str(config.data_dir))
            front = await _start_front(config)
            try:
                sled_id = await trio.to_thread.run_sync(sled_id_of, config.data_dir)
                rebooted = await trio.to_thread.run_sync(host_rebooted, config.data_dir)
                peers = await _peers(config, nursery, servers_stop)
                try:
                    await _serve_agent(
                        config, nursery, peers, sled_id, rebooted, token, front, shutdown,
                        task_status,
                    )  # fmt: skip
                finally:
                    if isinstance(peers.recording, RemoteNexusView):
                        with trio.CancelScope(shield=True):
                            await peers.recording.aclose()
            finally:
                if front is not None:
                    await front.aclose()
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
            sim_host = await attach_sim_host(
                config.data_dir,
                nexus_listen=config.nexus_listen,
                propolis_listen=config.sim_propolis_listen,
            )
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
        fleet = SimPropolisFleet(listen=config.sim_propolis_listen)
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
        app = recording_nexus_app(in_process)
        nexus_url = await _start_server(nursery, app, config.nexus_listen, stop, announce=False)
        recording = in_process
    return _Peers(nexus_url, recording, fleet, launcher, sim_host)


async def _serve_agent(
    config: DaemonConfig,
    nursery: trio.Nursery,
    peers: _Peers,
    sled_id: uuid.UUID,
    rebooted: bool,
    token: str | None,
    front: FrontProcess | None,
    shutdown: trio.Event,
    task_status: trio.TaskStatus[DaemonInfo],
) -> None:
    """The agent on ``peers``, served over HTTP until ``shutdown`` (through ``front``,
    the front process, if there is one)."""
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
        gc.disable()  # until the start's VMMs are taken back (``_after_readoption``)
        async with open_sled_agent(
            config.agent, host, sled_id=sled_id, host_rebooted=rebooted
        ) as agent:
            api_stop, api_done = trio.Event(), trio.Event()
            api_app = build_app(agent, token=token, reads=config.reads)
            api_url = await _start_server(
                nursery,
                api_app,
                config.listen,
                api_stop,
                limits=config.http,
                # Nothing to re-adopt (a first start, 0 VMMs): no front at all. Else a
                # connection the front took in its moment before the handover lived on it
                # up to keep_alive_s, outside the agent's connection cap.
                front=config.http.front_thread and not agent.readoption_done.is_set(),
                front_until=agent.readoption_done,
                front_process=front,
                registry=agent.manager.registry,
                settings=FrontSettings(
                    limits=config.http,
                    reads=config.reads,
                    token=token,
                    debug_requests=LOG_SETTINGS["level"] == "debug",
                ),
                done=api_done,
            )
            log.info(
                "daemon_listening", api=api_url, nexus=nexus_url, data_dir=str(config.data_dir)
            )
            nursery.start_soon(_after_readoption, agent, archiver)
            task_status.started(
                DaemonInfo(
                    api_url,
                    nexus_url,
                    agent,
                    peers.fleet,
                    peers.recording,
                    peers.sim_host,
                    api_app.admission,
                    front.process.pid if front is not None else None,
                    front,
                )
            )
            await shutdown.wait()
            log.info("daemon_stopping")
            api_stop.set()
        # Leaving the agent drained its reaper and notifier (shielded, bounded). The API's
        # answers in flight (a bundle download) finish meanwhile, within their grace: the
        # caller cancels the servers once this returns. The front process first finishes
        # its own, then the agent the connections it handed over: twice the grace.
        with trio.move_on_after(2 * config.http.graceful_s + 2):
            await api_done.wait()
    finally:
        gc.enable()  # (a start that failed before its VMMs were taken back)
        with trio.CancelScope(shield=True):
            await nexus_pool.aclose()
            if isinstance(archiver, ProcessArchiver):
                await archiver.aclose()
