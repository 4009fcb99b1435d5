"""The processes a benchmark or fault run drives: ``sledagent sim`` and the daemon.

Each runs as a process of its own, as on a host: the agent's figures are its own, and a
signal (SIGKILL, SIGTERM) reaches the daemon as it would there.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import trio

from .._wire import VmmState

_CLI = [sys.executable, "-c", "from sledagent._cli import main; main()"]


def daemon_config(
    root: Path, nexus_url: str, fleet_url: str, *, log_mb: float, agent: str = ""
) -> str:
    """The daemon's TOML for a run under ``root``: local zones with ``log_mb`` MB of seeded
    logs each, Propolis from the sim process's fleet, its Nexus; ``agent``: lines of the
    ``[agent]`` table."""
    return (
        f'listen = "127.0.0.1:0"\ndata_dir = "{root / "data"}"\n'
        f'nexus_url = "{nexus_url}"\npropolis = "remote"\n'
        f'sim_fleet_url = "{fleet_url}"\nlog_rate_bps = 0\n'
        f'seed_log_mb = {log_mb}\nseed_cache = "{root / "seed"}"\n'
        f"[agent]\n{agent}"
    )


@asynccontextmanager
async def sim_process(nexus_listen: str | None = None) -> AsyncIterator[tuple[str, str]]:
    """Start ``sledagent sim`` (its Nexus at ``nexus_listen``, default any free port);
    yields (nexus_url, fleet_url); stops it with SIGTERM."""
    argv = [*_CLI, "sim"] + ([] if nexus_listen is None else ["--nexus-listen", nexus_listen])
    proc = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        buf = b""
        while buf.count(b"\n") < 2:
            chunk = await proc.stdout.receive_some()
            if not chunk:
                raise RuntimeError("sledagent sim exited before listening")
            buf += chunk
        urls = dict(line.split(" ", 1) for line in buf.decode().splitlines()[:2])
        yield urls["nexus"], urls["fleet"]
    finally:
        proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(10, shield=True) as scope:
            await proc.wait()
        if scope.cancelled_caught:
            proc.kill()
        if proc.stdout is not None:
            await proc.stdout.aclose()


async def nexus_first_times(
    client: httpx.AsyncClient, nexus_url: str, pids: list[uuid.UUID], state: VmmState
) -> dict[uuid.UUID, float]:
    """Wait (one long request to the sim Nexus) until every VMM reached ``state``."""
    body = {"ids": [str(p) for p in pids], "state": state.value, "timeout_s": 3600}
    response = await client.post(f"{nexus_url}/sim/wait", json=body, timeout=None)
    response.raise_for_status()
    return {uuid.UUID(k): v for k, v in response.json().items()}


async def start_daemon(config: Path, log: Path) -> tuple[trio.Process, str]:
    argv = [*_CLI, "run", "--config", str(config)]
    err = await trio.to_thread.run_sync(open, log, "ab")
    try:
        proc = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE, stderr=err)
    finally:
        err.close()  # the child has its own copy
    assert proc.stdout is not None
    buf = b""
    while b"\n" not in buf:
        chunk = await proc.stdout.receive_some()
        if not chunk:
            raise RuntimeError(f"the daemon exited before listening (log: {log})")
        buf += chunk
    line = buf.split(b"\n", 1)[0].decode()  # "sledagent listening on <url>"
    return proc, line.split()[3]


async def stop_process(proc: trio.Process, sig: int) -> int | None:
    """Signal the daemon and wait for it; its exit status."""
    if proc.returncode is None:
        proc.send_signal(sig)
        with trio.move_on_after(30, shield=True) as scope:
            await proc.wait()
        if scope.cancelled_caught:
            proc.kill()
            await proc.wait()
    if proc.stdout is not None:
        await proc.stdout.aclose()
    return proc.returncode
