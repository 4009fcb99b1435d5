"""The embedded default's simulated world, in a process that outlives the agent.

A real sled's Propolis zones keep running when its sled agent restarts; so must the
simulated ones, or the embedded default could not show a restart that costs no guest.
``attach_sim_host`` finds the ``sledagent sim`` process serving this data directory
(through ``<data_dir>/sim-host.json``: its pid and URLs) or spawns one, detached in a
session of its own so that neither a kill -9 of the agent nor a Ctrl-C at its terminal
reaches it. While attached, the agent renews a lease every ``LEASE_PERIOD_S``; the host
exits by itself once it serves no Propolis and no lease was renewed for
``IDLE_EXIT_S``, so nothing is left running once the guests are gone.

``RemoteNexusView`` reads what the host's recording Nexus received (``/sim/updates``,
``/sim/wait``), for tests, the demo and benchmarks that used the in-process one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import sys
import uuid
from pathlib import Path
from typing import Any

import attrs
import structlog
import trio

from .._failures import StartupError
from .._h1client import ConnectionFailed, H1Pool
from .._preflight import check_listen
from .._wire import VmmState
from ._host import lock_path

log = structlog.get_logger("sledagent.sim")

STATE_NAME = "sim-host.json"
LOG_NAME = "sim-host.log"
LEASE_PERIOD_S = 2.0
#: Exit once idle (no Propolis, no lease) this long: well past a lease period, short
#: enough that a demo's host is gone soon after it.
IDLE_EXIT_S = 15.0
_START_TIMEOUT_S = 30.0
#: How long a host holding the lock gets to write its state file again (it does every 1 s).
_RESTORE_WAIT_S = 5.0
#: Starts argv[2:] detached, its output appended to argv[1]; prints its pid and exits.
_LAUNCH = (
    "import subprocess, sys\n"
    "out = open(sys.argv[1], 'ab')\n"
    "p = subprocess.Popen(sys.argv[2:], stdin=subprocess.DEVNULL, stdout=out, stderr=out,"
    " start_new_session=True)\n"
    "print(p.pid)\n"
)


class SimHostError(StartupError):
    """The simulated host could not be found or started (one line, names the log)."""


@attrs.frozen
class SimHost:
    """A running ``sledagent sim`` process serving one data directory."""

    pid: int
    nexus_url: str
    fleet_url: str
    state_file: Path

    def kill(self) -> None:
        """Stop it at once, guests and all (tests; an operator's ``sledagent sim-stop``)."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.state_file.unlink()
        except OSError:
            pass


def read_state(data_dir: Path) -> SimHost | None:
    """The host recorded for ``data_dir``, if its process still lives."""
    path = Path(data_dir) / STATE_NAME
    try:
        state = json.loads(path.read_text())
        host = SimHost(int(state["pid"]), str(state["nexus_url"]), str(state["fleet_url"]), path)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return host if _alive(host.pid) else None


def _lock_held(state_file: Path) -> bool:
    """Whether a live sim host holds this state file's lock (``_host.SimHostBusy``)."""
    try:
        fd = os.open(lock_path(state_file), os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # (closing drops a lock this probe took)
    return False


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


async def _answers(host: SimHost) -> bool:
    pool = H1Pool(host.fleet_url, max_connections=1, max_idle=0)
    try:
        response = await pool.request("POST", "/fleet/lease", timeout_s=5.0)
        return response.status == 200
    except ConnectionFailed:
        return False
    finally:
        with trio.CancelScope(shield=True):
            await pool.aclose()


async def attach_sim_host(
    data_dir: Path, *, nexus_listen: str = "127.0.0.1:0", propolis_listen: str = "127.0.0.1:0"
) -> SimHost:
    """The host serving ``data_dir``: the one already running, or a new one whose
    recording Nexus and simulated Propolis listen where given."""
    data_dir = Path(data_dir)
    found = read_state(data_dir)
    if found is None and await trio.to_thread.run_sync(_lock_held, data_dir / STATE_NAME):
        # A host serves this data dir but its state file is gone or garbled: it writes
        # it again within a second. Never a second host beside the guests of the first.
        with trio.move_on_after(_RESTORE_WAIT_S):
            while found is None:
                await trio.sleep(0.1)
                found = read_state(data_dir)
        if found is None:
            raise SimHostError(
                f"a simulated host serves {data_dir} (it holds {lock_path(data_dir / STATE_NAME)})"
                f" but {STATE_NAME} stays unreadable; stop that host (fuser -k on the lock file)"
            )
    if found is not None and await _answers(found):
        log.info("sim_host_found", pid=found.pid, fleet=found.fleet_url)
        if not nexus_listen.endswith(":0") and _authority(found.nexus_url) != nexus_listen:
            # Its guests outlive the agent, so it is kept: say where its Nexus really is.
            log.warning(
                "sim_host_nexus_listen_ignored",
                nexus_listen=nexus_listen,
                nexus_url=found.nexus_url,
                reason="a simulated host already serves this data directory",
            )
        return found
    # What the host would report only in its log, the agent says itself (one line).
    # Not sim_propolis_listen: a port taken there means the next free one.
    await trio.to_thread.run_sync(check_listen, nexus_listen)
    await trio.to_thread.run_sync(lambda: data_dir.mkdir(parents=True, exist_ok=True))
    state_file = data_dir / STATE_NAME
    log_path = data_dir / LOG_NAME
    log_start = await trio.to_thread.run_sync(_size, log_path)
    argv = [
        sys.executable, "-c", "from sledagent._cli import main; main()",
        "sim", "--state-file", str(state_file), "--idle-exit-s", str(IDLE_EXIT_S),
        "--nexus-listen", nexus_listen, "--propolis-listen", propolis_listen,
    ]  # fmt: skip
    # Through a launcher that exits at once: the host is nobody's child (no zombie for
    # the agent to reap, nothing the agent's process holds), and in a session of its own
    # (a Ctrl-C at the agent's terminal, a service manager's kill of the agent's process
    # group, do not reach the guests).
    launched = await trio.run_process(
        [sys.executable, "-c", _LAUNCH, str(log_path), *argv],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    if launched.returncode != 0:
        raise SimHostError(
            f"the simulated host could not be launched: {launched.stderr.decode().strip()}"
        )
    pid = int(launched.stdout)
    with trio.move_on_after(_START_TIMEOUT_S):
        while _alive(pid):
            host = read_state(data_dir)
            if host is not None and host.pid == pid and await _answers(host):
                log.info("sim_host_started", pid=host.pid, fleet=host.fleet_url)
                return host
            await trio.sleep(0.05)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    said = await trio.to_thread.run_sync(_last_error, log_path, log_start)
    if said:  # its own one line: "cannot listen on ...: address already in use"
        raise SimHostError(f"{said} (the simulated host did not start; its log: {log_path})")
    raise SimHostError(f"the simulated host did not start (its log: {log_path})")


def _authority(url: str) -> str:
    return url.split("://", 1)[-1].rstrip("/")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _last_error(log_path: Path, start: int) -> str | None:
    """The last ``sledagent: ...`` line the host wrote to its log since ``start``."""
    try:
        with log_path.open("rb") as f:
            f.seek(start)
            text = f.read(1 << 16).decode(errors="replace")
    except OSError:
        return None
    said = [line for line in text.splitlines() if line.startswith("sledagent: ")]
    return said[-1].removeprefix("sledagent: ") if said else None


async def renew_lease(host: SimHost) -> None:
    """Tell the host the agent is alive, every ``LEASE_PERIOD_S``, until cancelled."""
    pool = H1Pool(host.fleet_url, max_connections=1, max_idle=1)
    try:
        while True:
            try:
                await pool.request("POST", "/fleet/lease", timeout_s=5.0)
            except ConnectionFailed as exc:
                log.warning("sim_host_lease_failed", error=str(exc))
            await trio.sleep(LEASE_PERIOD_S)
    finally:
        with trio.CancelScope(shield=True):
            await pool.aclose()


class RemoteNexusView:
    """What the sim host's recording Nexus received, over its ``/sim/...`` routes."""

    def __init__(self, nexus_url: str) -> None:
        self.url = nexus_url
        self._pool = H1Pool(nexus_url, max_connections=4, max_idle=4)

    async def wait_for(
        self, propolis_id: uuid.UUID, state: VmmState, *, timeout_s: float = 600.0
    ) -> float:
        """When (the host's clock) this VMM was first reported in ``state``; waits."""
        body = json.dumps({"ids": [str(propolis_id)], "state": state.value, "timeout_s": timeout_s})
        response = await self._pool.request(
            "POST", "/sim/wait", body.encode(), timeout_s=timeout_s + 5
        )
        if response.status != 200:
            raise TimeoutError(f"{propolis_id} never reached {state.value}: {response.body!r}")
        return float(json.loads(response.body)[str(propolis_id)])

    async def updates(self) -> list[dict[str, Any]]:
        """Every update received: ``{"time", "propolis_id", "state"}``, in arrival order."""
        response = await self._pool.request("GET", "/sim/updates", timeout_s=30.0)
        rows: list[dict[str, Any]] = json.loads(response.body)
        return rows

    async def migrations(self) -> list[dict[str, Any]]:
        """Every migration's two sides as received, outcome and breaks (``/sim/migrations``)."""
        response = await self._pool.request("GET", "/sim/migrations", timeout_s=30.0)
        rows: list[dict[str, Any]] = json.loads(response.body)
        return rows

    async def wait_migrations(
        self, ids: list[uuid.UUID], *, timeout_s: float = 600.0, both_sides: bool = True
    ) -> list[dict[str, Any]]:
        """Those migrations once each has ended (``/sim/migrations/wait``)."""
        body = {"ids": [str(i) for i in ids], "timeout_s": timeout_s, "both_sides": both_sides}
        response = await self._pool.request(
            "POST", "/sim/migrations/wait", json.dumps(body).encode(), timeout_s=timeout_s + 5
        )
        if response.status != 200:
            raise TimeoutError(f"migrations did not end: {response.body!r}")
        rows: list[dict[str, Any]] = json.loads(response.body)
        return rows

    async def problems(self) -> list[str]:
        """Every break of the protocol the recording Nexus found (``/sim/problems``)."""
        response = await self._pool.request("GET", "/sim/problems", timeout_s=30.0)
        found: list[str] = json.loads(response.body)
        return found

    async def aclose(self) -> None:
        await self._pool.aclose()
