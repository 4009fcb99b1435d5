"""The illumos zone backend: zones, SMF and ZFS, driven by their commands.

The agent's real home. Every action is a command run as an argument list (no shell)
through a ``CommandRunner``: the real one runs processes; tests feed recorded outputs
(``tests/fixtures/illumos/``, written from the man pages' formats and omicron's examples)
and assert the exact argument lists.

- Zones: ``zoneadm list -cp`` (parsed), ``zonecfg``/``zoneadm install|boot`` to install,
  ``zoneadm halt``, ``uninstall -F``, ``zonecfg delete -F`` to remove (each step skipped
  when the zone is already past it: idempotent).
- Diagnostics (omicron's list): zone-wide ``ptree``, ``uptime``, ``last``, ``who``,
  ``svcs -p``, ``netstat -an`` in the zone (``zlogin``); the zone's services from
  ``svcs -H -o fmri``, their processes from ``ptree -s <fmri>``, and per process
  ``pfiles``, ``pstack``, ``pargs``.
- Snapshots: one per bundle, ``zfs snapshot -o oxide:for-zone-bundle=true
  <dataset>@<bundle-id>`` (never per pool), read through ``.zfs/snapshot/<bundle-id>/``
  (the archived logs come from the snapshot, not the live filesystem as in omicron),
  ``zfs destroy`` after. The startup sweep lists snapshots carrying the property and
  destroys them (omicron's sweep matches a name it never creates).
- Quota of the debug dataset: ``zfs list -Hpo quota,avail``.

Selected with ``backend = "illumos"``; on a host without these tools the daemon refuses
to start and names what is missing (``require_tools``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import attrs
import structlog
import trio

from ._host import ZONE_PREFIX, CommandOutput, LogSource, Snapshot, Zone, ZoneCommand, ZoneSpec

log = structlog.get_logger("sledagent.illumos")

SNAPSHOT_PROPERTY = "oxide:for-zone-bundle"
TOOLS = ("zoneadm", "zonecfg", "zlogin", "zfs")
ZONE_WIDE_COMMANDS: tuple[tuple[str, ...], ...] = (
    ("ptree",),
    ("uptime",),
    ("last",),
    ("who",),
    ("svcs", "-p"),
    ("netstat", "-an"),
)
PROCESS_COMMANDS = ("pfiles", "pstack", "pargs")
#: Propolis's SMF log in its zone (what ``svcs -L`` answers for its service).
LIVE_LOG = "/var/svc/log/oxide-propolis-server:default.log"
MAX_OUTPUT = 1 << 20


class CommandFailed(RuntimeError):
    def __init__(self, argv: Sequence[str], status: int, output: bytes) -> None:
        text = output.decode(errors="replace").strip()[-500:]
        super().__init__(f"{' '.join(argv)}: exit {status}: {text}")
        self.argv, self.status, self.output = tuple(argv), status, output


@attrs.frozen
class RunResult:
    exit_status: int
    output: bytes  # stdout and stderr together, as an operator would read them


class CommandRunner(Protocol):
    """Runs one command (an argument list). Cancellation kills it."""

    async def run(self, argv: Sequence[str]) -> RunResult: ...


class SubprocessRunner:
    async def run(self, argv: Sequence[str]) -> RunResult:
        result = await trio.run_process(
            list(argv), capture_stdout=True, stderr=subprocess.STDOUT, check=False, stdin=b""
        )
        return RunResult(result.returncode, result.stdout[-MAX_OUTPUT:])


def require_tools(tools: Sequence[str] = TOOLS) -> None:
    """Fail with a clear message on a host without zones (``backend = "illumos"``)."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise RuntimeError(
            f'backend = "illumos" needs {", ".join(tools)} on PATH; not found: '
            f"{', '.join(missing)} (this host has no illumos zones: use the local backend)"
        )


@attrs.frozen(kw_only=True)
class IllumosConfig:
    #: Zones live under ``<zone_root>/<name>``; their dataset is
    #: ``<zone_dataset>/<name>`` (omicron: ``oxp_<pool>/crypt/zone``).
    zone_root: Path = attrs.field(default=Path("/zone"), converter=Path)
    zone_dataset: str = "rpool/zone"
    #: Prefix privileged commands with ``pfexec`` (an agent not running as root).
    pfexec: bool = True
    brand: str = "omicron1"
    #: The service whose log is archived (``svcs -L`` names its file).
    propolis_fmri: str = "svc:/oxide/propolis-server:default"


@attrs.frozen
class ZoneListing:
    """One line of ``zoneadm list -cp``: zoneid:zonename:state:zonepath:uuid:brand:ip-type."""

    zone_id: str
    name: str
    state: str
    path: str
    brand: str


def parse_zoneadm_list(text: str) -> list[ZoneListing]:
    out = []
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = line.split(":")
        if len(fields) < 7:
            raise ValueError(f"unexpected zoneadm list -cp line: {line!r}")
        out.append(ZoneListing(fields[0], fields[1], fields[2], fields[3], fields[5]))
    return out


#: ``ptree -s`` shows a service's processes under their ancestors; these are not its own.
_SMF_ANCESTORS = ("/sbin/init", "/usr/sbin/init", "/lib/svc/bin/svc.startd", "zsched")


def parse_ptree_pids(text: str) -> list[int]:
    """The service's own PIDs from ``ptree -s <fmri>`` (each line: pid, command)."""
    pids = []
    for line in text.splitlines():
        pid, _, command = line.strip().partition(" ")
        if pid.isdigit() and command.strip().split(" ", 1)[0] not in _SMF_ANCESTORS:
            pids.append(int(pid))
    return pids


def parse_quota(text: str) -> tuple[int | None, int]:
    """``zfs list -Hpo quota,avail <ds>``: (quota or None when 0 = none, available)."""
    quota, avail = text.split()
    return (int(quota) or None), int(avail)


class IllumosZoneBackend:
    def __init__(self, config: IllumosConfig, runner: CommandRunner | None = None) -> None:
        self.config = config
        self.runner = runner or SubprocessRunner()

    # --- commands -------------------------------------------------------------------

    def _priv(self, *argv: str) -> tuple[str, ...]:
        return ("pfexec", *argv) if self.config.pfexec else argv

    async def _check(self, argv: Sequence[str]) -> bytes:
        result = await self.runner.run(argv)
        if result.exit_status != 0:
            raise CommandFailed(argv, result.exit_status, result.output)
        return result.output

    def _dataset(self, zone_name: str) -> str:
        return f"{self.config.zone_dataset}/{zone_name}"

    # --- lifecycle --------------------------------------------------------------------

    async def _listing(self) -> dict[str, ZoneListing]:
        text = await self._check(self._priv("zoneadm", "list", "-cp"))
        return {z.name: z for z in parse_zoneadm_list(text.decode())}

    async def install(self, spec: ZoneSpec) -> Zone:
        name = spec.zone_name
        zone = Zone(name, spec.propolis_id, spec.propolis_addr, spec.nic_ids)
        path = self.config.zone_root / name
        try:
            await self._check(
                self._priv(
                    "zonecfg", "-z", name,
                    f"create -b; set zonepath={path}; set brand={self.config.brand}; "
                    "set autoboot=false; set ip-type=exclusive",
                )
            )  # fmt: skip
            await self._check(self._priv("zoneadm", "-z", name, "install"))
            await self._check(self._priv("zoneadm", "-z", name, "boot"))
        except BaseException:
            with trio.CancelScope(shield=True):  # leave nothing behind
                await self.halt_and_remove(zone)
            raise
        return zone

    async def zone_exists(self, zone: Zone) -> bool:
        return zone.name in await self._listing()

    async def list_zones(self) -> list[Zone]:
        zones = []
        for listing in (await self._listing()).values():
            if listing.name.startswith(ZONE_PREFIX):
                try:
                    pid = uuid.UUID(listing.name.removeprefix(ZONE_PREFIX))
                except ValueError:
                    pid = None
                # Where its Propolis listens is the registration's (the journal's).
                zones.append(Zone(listing.name, pid, "", running=listing.state == "running"))
        return zones

    async def halt_and_remove(self, zone: Zone) -> None:
        """Halt, uninstall, delete: each only if the zone is still in that state."""
        listing = (await self._listing()).get(zone.name)
        if listing is None:
            return
        if listing.state in ("running", "ready", "shutting_down", "down", "mounted"):
            await self._check(self._priv("zoneadm", "-z", zone.name, "halt"))
            listing = attrs.evolve(listing, state="installed")
        if listing.state in ("installed", "incomplete", "unavailable"):
            await self._check(self._priv("zoneadm", "-z", zone.name, "uninstall", "-F"))
        await self._check(self._priv("zonecfg", "-z", zone.name, "delete", "-F"))

    async def stop_vmm(self, zone: Zone) -> None:
        """Kill the zone's ``propolis-server`` (``pkill`` exits 1 when none runs: fine)."""
        argv = self._in_zone(zone, "pkill", "-KILL", "-x", "propolis-server")
        result = await self.runner.run(argv)
        if result.exit_status not in (0, 1):
            raise CommandFailed(argv, result.exit_status, result.output)

    # --- diagnostics ------------------------------------------------------------------

    def _in_zone(self, zone: Zone, *argv: str) -> tuple[str, ...]:
        return self._priv("zlogin", zone.name, *argv)

    async def bundle_commands(self, zone: Zone) -> Sequence[ZoneCommand]:
        cmds = [
            ZoneCommand(self._in_zone(zone, *argv), name=argv[0]) for argv in ZONE_WIDE_COMMANDS
        ]
        fmris = await self.runner.run(self._in_zone(zone, "svcs", "-H", "-o", "fmri"))
        pids: list[int] = []
        if fmris.exit_status == 0:
            for fmri in fmris.output.decode().split():
                tree = await self.runner.run(self._in_zone(zone, "ptree", "-s", fmri))
                if tree.exit_status == 0:
                    pids += [p for p in parse_ptree_pids(tree.output.decode()) if p not in pids]
        for pid in pids:
            for tool in PROCESS_COMMANDS:
                cmds.append(ZoneCommand(self._in_zone(zone, tool, str(pid)), name=f"{tool}.{pid}"))
        return cmds

    async def run_command(self, zone: Zone, command: ZoneCommand) -> CommandOutput:
        t0 = trio.current_time()
        try:
            result = await self.runner.run(command.argv)
        except FileNotFoundError:
            return CommandOutput(
                command.name, command.argv, b"", None, trio.current_time() - t0,
                error=f"{command.argv[0]}: not found on this host",
            )  # fmt: skip
        return CommandOutput(
            command.name, command.argv, result.output[-MAX_OUTPUT:], result.exit_status,
            trio.current_time() - t0,
        )  # fmt: skip

    # --- snapshots --------------------------------------------------------------------

    async def snapshot(self, zone: Zone, bundle_id: uuid.UUID) -> Snapshot:
        name = f"{self._dataset(zone.name)}@{bundle_id}"
        await self._check(self._priv("zfs", "snapshot", "-o", f"{SNAPSHOT_PROPERTY}=true", name))
        root = self.config.zone_root / zone.name / ".zfs" / "snapshot" / str(bundle_id)
        try:
            # The live log's path in the zone (e.g. /var/svc/log/oxide-propolis-server:
            # default.log); the snapshot holds it and its rotated files beside it.
            where = await self._check(self._in_zone(zone, "svcs", "-L", self.config.propolis_fmri))
            live = Path(where.decode().strip())
            files = await trio.to_thread.run_sync(
                _log_files, root / "root" / live.parent.relative_to("/"), live.name
            )
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.destroy_snapshot(Snapshot(name, zone.name, bundle_id))
            raise
        return Snapshot(name, zone.name, bundle_id, files, _missing(files, live.name))

    async def destroy_snapshot(self, snapshot: Snapshot) -> None:
        result = await self.runner.run(self._priv("zfs", "destroy", snapshot.name))
        if result.exit_status != 0 and b"could not find" not in result.output:
            raise CommandFailed(
                ("zfs", "destroy", snapshot.name), result.exit_status, result.output
            )

    async def _tagged_snapshots(self) -> list[str]:
        columns = f"name,{SNAPSHOT_PROPERTY}"
        text = await self._check(
            self._priv("zfs", "list", "-H", "-p", "-t", "snapshot", "-o", columns)
        )
        names = []
        for line in text.decode().splitlines():
            name, _, value = line.partition("\t")
            if value.strip() == "true":
                names.append(name)
        return names

    async def sweep_snapshots(self) -> int:
        """Destroy every snapshot carrying our property."""
        names = await self._tagged_snapshots()
        for name in names:
            await self.destroy_snapshot(Snapshot(name, "", uuid.UUID(int=0)))
        return len(names)

    async def leftover_snapshots(self) -> list[Snapshot]:
        """Snapshots carrying our property, with the Propolis log files they hold (read
        through ``.zfs/snapshot``); ones that are not a zone's bundle are destroyed."""
        found = []
        prefix = f"{self.config.zone_dataset}/"
        for name in await self._tagged_snapshots():
            dataset, _, snap = name.partition("@")
            try:
                if not dataset.startswith(prefix):
                    raise ValueError("not under the zone dataset")
                zone_name, bundle_id = dataset.removeprefix(prefix), uuid.UUID(snap)
            except ValueError:
                await self.destroy_snapshot(Snapshot(name, "", uuid.UUID(int=0)))
                continue
            root = self.config.zone_root / zone_name / ".zfs" / "snapshot" / snap
            live = Path(LIVE_LOG)  # the zone may be gone: no svcs -L; the default path
            files = await trio.to_thread.run_sync(
                _log_files, root / "root" / live.parent.relative_to("/"), live.name
            )
            found.append(Snapshot(name, zone_name, bundle_id, files, _missing(files, live.name)))
        return found

    async def quota(self, dataset: str) -> tuple[int | None, int]:
        """The debug dataset's quota (None: unlimited) and available bytes."""
        return parse_quota(
            (await self._check(self._priv("zfs", "list", "-Hpo", "quota,avail", dataset))).decode()
        )


def _log_files(log_dir: Path, live_name: str) -> tuple[LogSource, ...]:
    """The service's log and its rotated files (``<name>.N``), from the snapshot."""
    files = []
    try:
        entries = sorted(os.scandir(log_dir), key=lambda e: e.name)
    except FileNotFoundError:
        return ()
    for entry in entries:
        if entry.name.startswith(live_name) and entry.is_file():
            files.append(LogSource(entry.name, entry.path, entry.stat().st_size))
    return tuple(files)


def _missing(files: tuple[LogSource, ...], live_name: str) -> tuple[str, ...]:
    """The service's log, if the snapshot holds no file of that name (the bundle's
    manifest says so)."""
    return () if any(f.name == live_name for f in files) else (live_name,)
