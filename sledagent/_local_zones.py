"""The local zone backend (the default; runs on any Linux).

A zone is a directory tree, ``<root>/zones/<zone_name>/``, with ``zone.json`` (who it is,
which processes are its own) and ``root/var/svc/log/`` laid out like a Propolis zone's
service log directory; archived logs live apart in ``<root>/archive/<zone_name>/`` with a
Unix timestamp suffix, as omicron archives them to a debug dataset. The zone's VMM is a
real process (``sledagent._logwriter``, until the simulated Propolis takes its place),
detached in a session of its own so that it outlives an agent restart like a real zone;
it is halted through its pid (recorded in ``zone.json``, checked against its command line).

Diagnostics are real Linux commands about the zone's processes, as argument lists:
``ps`` of the zone's processes (none if it has none on this host), the host-wide
``uptime``, ``ss -an``, ``who``, ``last`` (the same in every zone's bundle: shared between
the zones bundled within ``host_command_ttl_s``, see ``_shared_commands``); per process the
local analogues of ``pargs``/``pfiles``/``pstack`` (``cat /proc/<pid>/cmdline``,
``ls -l /proc/<pid>/fd``, ``cat /proc/<pid>/status``; the two ``cat`` are read in-process,
with the same output, rather than spawned). A missing tool is recorded by the bundler,
not raised.

A snapshot is a directory ``<root>/snapshots/<bundle_id>/`` (``_local_snapshots``).
Every filesystem walk runs in a worker thread.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, TypeVar

import attrs
import structlog
import trio

from ._host import CommandOutput, Snapshot, Zone, ZoneCommand, ZoneSpec, propolis_id_in
from ._local_snapshots import (
    leftover_snapshots,
    make_snapshot,
    remove_snapshot,
    sweep_snapshots,
)
from ._seed import seed_from_cache, seed_logs
from ._shared_commands import SharedCommands

log = structlog.get_logger("sledagent.zones.local")
R = TypeVar("R")

LOG_SUBDIR = Path("root/var/svc/log")
MAX_COMMAND_OUTPUT = 1 << 20
#: Commands whose output is about the host, not the zone (local zones share the host's).
HOST_COMMANDS = (("uptime",), ("ss", "-an"), ("who",), ("last", "-n", "20"))


@attrs.frozen(kw_only=True)
class LocalZonesConfig:
    root: Path = attrs.field(converter=Path)
    #: Bytes/s each zone's log writer appends; 0 starts no writer process.
    log_rate_bps: int = 2048
    rotate_bytes: int = 1 << 20
    keep_rotated: int = 4
    #: Log volume to create at install (rotated and archived files), for realism.
    seed_log_bytes: int = 0
    #: Generate the seed logs once here and hard-link the immutable ones into each zone
    #: (benchmarks with many zones); unset: every zone gets its own generated logs.
    seed_cache: Path | None = attrs.field(default=None, converter=attrs.converters.optional(Path))
    #: The live log is copied into a snapshot up to this many (newest) bytes.
    max_live_copy_bytes: int = 64 << 20
    #: SIGTERM, then SIGKILL after this long.
    term_timeout_s: float = 5.0
    #: A host-wide command's output is shared by the bundles taken within this long of
    #: its run (0: every bundle runs its own).
    host_command_ttl_s: float = 1.0
    #: Filesystem calls (snapshots, teardown, pid lookups) in worker threads at once.
    #: Each is a few system calls whose thread waits for the GIL after every one while
    #: the trio thread is busy: the calls are latency-bound, not disk-bound. 4 made them
    #: the mass stop's bottleneck at N=1000 (docs/performance.md, "Session 7").
    fs_concurrency: int = 16


def _zone_dir(cfg: LocalZonesConfig, name: str) -> Path:
    return cfg.root / "zones" / name


@attrs.frozen(kw_only=True)
class LogSpec:
    """Where a zone's Propolis writes its log, and how much (for a launched Propolis)."""

    log_dir: Path = attrs.field(converter=Path)
    #: Rotated files beyond ``keep`` move here with a Unix timestamp suffix.
    archive_dir: Path = attrs.field(converter=Path)
    rate_bps: int = attrs.field(default=2048, validator=attrs.validators.ge(1))
    rotate_bytes: int = attrs.field(default=1 << 20, validator=attrs.validators.ge(1024))
    keep: int = attrs.field(default=4, validator=attrs.validators.ge(1))


class PropolisLauncher(Protocol):
    """Starts and stops the Propolis of a zone (the simulated fleet, for the daemon).

    With ``logs``, the Propolis writes its log into the zone as a real one would."""

    async def launch(
        self, zone_name: str, logs: LogSpec | None = None, *, addr: str | None = None
    ) -> str:
        """Start the zone's Propolis, at ``addr`` if it can listen there; its address."""
        ...

    async def retire(self, zone_name: str) -> None:
        """Stop the zone's Propolis (idempotent); returns once it is stopped (or its
        host is gone)."""
        ...


class LocalZoneBackend:
    def __init__(
        self, config: LocalZonesConfig, *, launcher: PropolisLauncher | None = None
    ) -> None:
        """With ``launcher``, each zone gets its own Propolis, whose address replaces the
        requested ``propolis_addr``; without, the zone's Propolis is expected at the
        address the VMM was registered with (``propolis = "external"``)."""
        self.config = config
        self.launcher = launcher
        self._fs_limiter = trio.CapacityLimiter(config.fs_concurrency)
        self.host_commands = SharedCommands(config.host_command_ttl_s)
        #: The pids this backend recorded in each zone's ``zone.json`` since it started
        #: (none for a zone whose Propolis is launched elsewhere). Phase 1 lists a zone
        #: known here without a thread to read them back: in a mass stop of 1000 zones
        #: each thread call waits for a thread and the GIL, tens of ms, while the zone is
        #: held (docs/performance.md, "Session 10"). Zones of a previous run are read from
        #: disk; teardown always reads the file (what it must kill).
        self._recorded_pids: dict[str, tuple[int, ...]] = {}

    # --- lifecycle --------------------------------------------------------------------

    async def install(self, spec: ZoneSpec) -> Zone:
        zone = Zone(spec.zone_name, spec.propolis_id, spec.propolis_addr, spec.nic_ids)
        try:
            await self._thread(self._create_tree, zone)
            self._recorded_pids[zone.name] = ()
            if self.launcher is not None:
                # The launched Propolis is the zone's VMM process: it writes the log.
                addr = await self.launcher.launch(
                    zone.name, self._log_spec(zone.name), addr=spec.propolis_addr
                )
                zone = attrs.evolve(zone, propolis_addr=addr)
                # Where it listens is what a restarted agent reads back (list_zones).
                await self._thread(self._update_meta, zone.name, {"propolis_addr": addr})
            elif self.config.log_rate_bps > 0:
                # No Propolis of ours here: a stand-in process writes the zone's log.
                started = await trio.run_process(
                    [*self._writer_argv(zone.name), "--daemonize"],
                    stdin=b"",
                    capture_stdout=True,
                )
                pids = [int(started.stdout)]
                self._recorded_pids[zone.name] = tuple(pids)  # before: a cancel must see it
                await self._thread(self._record_pids, zone.name, pids)
        except BaseException:
            with trio.CancelScope(shield=True):  # leave nothing behind
                await self.halt_and_remove(zone)
            raise
        return zone

    def _log_spec(self, name: str) -> LogSpec | None:
        c = self.config
        if c.log_rate_bps <= 0:
            return None
        return LogSpec(
            log_dir=_zone_dir(c, name) / LOG_SUBDIR,
            archive_dir=c.root / "archive" / name,
            rate_bps=c.log_rate_bps,
            rotate_bytes=c.rotate_bytes,
            keep=c.keep_rotated,
        )

    def _writer_argv(self, name: str) -> list[str]:
        c = self.config
        # Run the writer by its file: it needs only the standard library, and importing
        # it as a module would load the whole package in every zone's process.
        return [
            sys.executable, str(Path(__file__).with_name("_logwriter.py")),
            "--zone-name", name,
            "--log-dir", str(_zone_dir(c, name) / LOG_SUBDIR),
            "--archive-dir", str(c.root / "archive" / name),
            "--rate-bps", str(c.log_rate_bps),
            "--rotate-bytes", str(c.rotate_bytes),
            "--keep", str(c.keep_rotated),
        ]  # fmt: skip

    def _create_tree(self, zone: Zone) -> None:
        c = self.config
        zdir = _zone_dir(c, zone.name)
        (zdir / LOG_SUBDIR).mkdir(parents=True, exist_ok=True)
        meta = {
            "zone_name": zone.name,
            "propolis_id": str(zone.propolis_id) if zone.propolis_id else None,
            "propolis_addr": zone.propolis_addr,
            "nic_ids": sorted(str(n) for n in zone.nic_ids),
            "created": time.time(),
            "pids": [],
        }
        (zdir / "zone.json").write_text(json.dumps(meta))
        if c.seed_log_bytes > 0 and c.seed_cache is not None:
            seed_from_cache(
                c.seed_cache, zdir / LOG_SUBDIR, c.root / "archive" / zone.name, c.seed_log_bytes
            )
        elif c.seed_log_bytes > 0:
            seed_logs(zdir / LOG_SUBDIR, c.root / "archive" / zone.name, c.seed_log_bytes)

    def _record_pids(self, name: str, pids: list[int]) -> None:
        self._update_meta(name, {"pids": pids})

    def _update_meta(self, name: str, fields: dict[str, object]) -> None:
        path = _zone_dir(self.config, name) / "zone.json"
        meta = json.loads(path.read_text())
        meta.update(fields)
        tmp = path.with_name(".zone.json.tmp")
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, path)  # a crash leaves the old record or the new, whole

    async def _zone_pids(self, name: str) -> list[int]:
        """The zone's own processes still alive, for its diagnostics; no thread when
        this backend installed it and recorded none."""
        if self._recorded_pids.get(name) == ():
            await trio.lowlevel.checkpoint()
            return []
        return await self._thread(self._pids, name)

    def _pids(self, name: str) -> list[int]:
        try:
            meta = json.loads((_zone_dir(self.config, name) / "zone.json").read_text())
        except (FileNotFoundError, ValueError):
            return []
        # Only processes that are still ours (a pid may have been reused since).
        return [p for p in meta.get("pids", []) if _is_zone_process(p, name)]

    async def zone_exists(self, zone: Zone) -> bool:
        return await self._thread((_zone_dir(self.config, zone.name) / "zone.json").exists)

    async def list_zones(self) -> list[Zone]:
        """Every zone on disk (for the startup sweep)."""
        return await self._thread(self._list_zones)

    def _list_zones(self) -> list[Zone]:
        zones = []
        root = self.config.root / "zones"
        for zdir in sorted(root.iterdir() if root.is_dir() else []):
            if not zdir.is_dir():
                continue
            path = zdir / "zone.json"
            if not path.exists():
                # A kill mid-install or mid-teardown leaves a tree without its record:
                # still a zone to tear down, or it stays on the host unseen.
                zones.append(Zone(zdir.name, propolis_id_in(zdir.name), ""))
                continue
            try:
                meta = json.loads(path.read_text())
                pid = meta.get("propolis_id")
                zones.append(
                    Zone(
                        meta["zone_name"],
                        uuid.UUID(pid) if pid else None,
                        meta.get("propolis_addr", ""),
                        frozenset(uuid.UUID(n) for n in meta.get("nic_ids", [])),
                    )
                )
            except (ValueError, KeyError) as exc:  # a half-written zone is still a zone
                # Its name still says whose it is: a running guest's zone with a garbled
                # record is taken back (at the journaled address), not called vanished.
                log.warning("zone_metadata_unreadable", path=str(path), error=str(exc))
                zones.append(Zone(zdir.name, propolis_id_in(zdir.name), ""))
        return zones

    async def halt_and_remove(self, zone: Zone) -> None:
        """SIGTERM the zone's processes, SIGKILL after a deadline, remove the tree."""
        name = zone.name
        if self.launcher is not None:
            await self.launcher.retire(name)
        # From the file (the truth), not ``_recorded_pids``: nothing may outlive the zone.
        pids = await self._thread(self._pids, name)
        if pids:
            for pid in pids:
                _signal_group(pid, signal.SIGTERM)
            with trio.move_on_after(self.config.term_timeout_s):
                await _wait_all_exit(pids)
            for pid in await self._thread(self._pids, name):
                _signal_group(pid, signal.SIGKILL)
            await _wait_all_exit(pids)
        # One call for both trees (each thread call costs a GIL round trip per syscall).
        await self._thread(self._remove_trees, name)
        self._recorded_pids.pop(name, None)

    def _remove_trees(self, name: str) -> None:
        # The zone's own tree last: while it is there, a kill in between leaves a zone the
        # next start lists and removes again (with the archive tree).
        shutil.rmtree(self.config.root / "archive" / name, ignore_errors=True)
        shutil.rmtree(_zone_dir(self.config, name), ignore_errors=True)

    async def stop_vmm(self, zone: Zone) -> None:
        """The zone's launched Propolis is stopped (its server and any migration it was
        running); a Propolis of its own elsewhere (``external``) is not ours to stop."""
        if self.launcher is not None:
            await self.launcher.retire(zone.name)
        else:
            await trio.lowlevel.checkpoint()

    # --- diagnostics ------------------------------------------------------------------

    async def bundle_commands(self, zone: Zone) -> Sequence[ZoneCommand]:
        pids = await self._zone_pids(zone.name)
        cmds = [ZoneCommand(argv) for argv in HOST_COMMANDS]
        if pids:  # a zone whose Propolis runs elsewhere has no process here to list
            pid_list = ",".join(str(p) for p in pids)
            cmds.insert(
                0,
                ZoneCommand(
                    ("ps", "-o", "pid,ppid,stat,etime,rss,args", "--forest", "-p", pid_list)
                ),
            )
        for pid in pids:
            cmds += [
                ZoneCommand(("cat", f"/proc/{pid}/cmdline"), name=f"pargs.{pid}"),
                ZoneCommand(("ls", "-l", f"/proc/{pid}/fd"), name=f"pfiles.{pid}"),
                ZoneCommand(("cat", f"/proc/{pid}/status"), name=f"pstack.{pid}"),
            ]
        return cmds

    async def run_command(self, zone: Zone, command: ZoneCommand) -> CommandOutput:
        argv = command.argv
        if argv in HOST_COMMANDS and self.host_commands.ttl_s > 0:
            shared = await self.host_commands.run(argv, lambda: self._spawn(command))
            return attrs.evolve(shared, name=command.name)
        if len(argv) == 2 and argv[0] == "cat" and argv[1].startswith("/proc/"):
            # A process spawn costs ~5 ms of CPU; reading the file gives cat's output.
            t0 = trio.current_time()
            out, status = await trio.to_thread.run_sync(_cat, argv[1])
            return CommandOutput(command.name, argv, out, status, trio.current_time() - t0)
        return await self._spawn(command)

    async def _spawn(self, command: ZoneCommand) -> CommandOutput:
        t0 = trio.current_time()
        try:
            result = await trio.run_process(
                list(command.argv),
                capture_stdout=True,
                stderr=subprocess.STDOUT,
                check=False,
                stdin=b"",
            )
        except FileNotFoundError:
            return CommandOutput(
                command.name, command.argv, b"", None, trio.current_time() - t0,
                error=f"{command.argv[0]}: not found on this host",
            )  # fmt: skip
        out = result.stdout[-MAX_COMMAND_OUTPUT:]
        return CommandOutput(
            command.name, command.argv, out, result.returncode, trio.current_time() - t0
        )

    async def snapshot(self, zone: Zone, bundle_id: uuid.UUID) -> Snapshot:
        c = self.config
        return await self._thread(
            make_snapshot,
            c.root / "snapshots",
            zone.name,
            bundle_id,
            [_zone_dir(c, zone.name) / LOG_SUBDIR, c.root / "archive" / zone.name],
            c.max_live_copy_bytes,
        )

    async def destroy_snapshot(self, snapshot: Snapshot) -> None:
        await self._thread(remove_snapshot, Path(snapshot.name))

    async def sweep_snapshots(self) -> int:
        """Remove every tagged snapshot; returns how many."""
        return await self._thread(sweep_snapshots, self.config.root / "snapshots")

    async def leftover_snapshots(self) -> list[Snapshot]:
        return await self._thread(leftover_snapshots, self.config.root / "snapshots")

    async def _thread(self, fn: Callable[..., R], *args: object) -> R:
        """Blocking filesystem work, off the trio thread, a few at a time."""
        return await trio.to_thread.run_sync(fn, *args, limiter=self._fs_limiter)


def _cat(path: str) -> tuple[bytes, int]:
    """What ``cat path`` prints (stdout and stderr) and its exit status."""
    try:
        with open(path, "rb") as f:
            return f.read()[-MAX_COMMAND_OUTPUT:], 0
    except OSError as exc:
        return f"cat: {path}: {exc.strerror}\n".encode(), 1


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"  # a zombie is gone for us
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return False


def _is_zone_process(pid: int, zone_name: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return zone_name.encode() in f.read() and _alive(pid)
    except (FileNotFoundError, ProcessLookupError):
        return False


async def _wait_all_exit(pids: Sequence[int]) -> None:
    for pid in pids:
        await _wait_exit(pid)


async def _wait_exit(pid: int) -> None:
    """Wait for a process that is not our child: its pidfd turns readable at exit."""
    try:
        fd = os.pidfd_open(pid)
    except (ProcessLookupError, OSError):
        return  # already gone
    try:
        await trio.lowlevel.wait_readable(fd)
    finally:
        os.close(fd)


def _signal_group(pid: int, signo: int) -> None:
    try:
        os.killpg(pid, signo)  # the writer leads its own session and process group
    except (ProcessLookupError, PermissionError):
        pass
