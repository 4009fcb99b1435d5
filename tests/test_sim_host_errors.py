"""The simulated host's start, as an operator meets it: a port in use is one line naming
the address (``sledagent sim`` and the agent that spawns it alike), an unusable state
file is one line, and an address the existing host does not use is logged, not lost."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import structlog
import trio

from sledagent.sim._host import run_sim_host
from sledagent.sim._spawn import STATE_NAME, _last_error, attach_sim_host

CLI = [sys.executable, "-c", "from sledagent._cli import main; main()"]


@asynccontextmanager
async def taken_port() -> AsyncIterator[str]:
    """``127.0.0.1:PORT`` with something listening on it."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    try:
        yield f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"
    finally:
        for listener in listeners:
            await listener.aclose()


async def _run(args: list[str], cwd: Path) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k != "SLEDAGENT_TOKEN"}
    done = await trio.run_process([*CLI, *args], capture_stdout=True, capture_stderr=True,
                                  check=False, cwd=cwd, env=env)  # fmt: skip
    return done.returncode, done.stderr.decode().splitlines()[-1] if done.stderr else ""


async def test_a_nexus_port_in_use_is_one_line_naming_it_from_sim_and_from_the_agent(
    tmp_path: Path,
) -> None:
    config = tmp_path / "c.toml"
    with trio.fail_after(120):
        async with taken_port() as addr:
            config.write_text(
                f'nexus_listen = "{addr}"\nlisten = "127.0.0.1:0"\n'
                f'data_dir = "{tmp_path / "data"}"\n'
            )
            sim = await _run(["sim", "--nexus-listen", addr], tmp_path)
            agent = await _run(["run", "--config", str(config)], tmp_path)
    line = f"sledagent: cannot listen on {addr}: address already in use"
    assert sim == (1, line)
    assert agent == (1, line)


async def test_an_unusable_state_file_is_one_line(tmp_path: Path) -> None:
    where = tmp_path / "no" / "such" / "state.json"
    with trio.fail_after(60):
        ran = await _run(["sim", "--state-file", str(where)], tmp_path)
    assert ran == (1, f"sledagent: --state-file {where}: cannot write: no such file or directory")


async def test_an_existing_host_keeps_its_nexus_and_the_ignored_address_is_logged(
    tmp_path: Path,
) -> None:
    tmp_path.mkdir(exist_ok=True)
    shutdown = trio.Event()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nexus_url, _ = await nursery.start(
                lambda task_status: run_sim_host(
                    shutdown=shutdown, state_file=tmp_path / STATE_NAME, task_status=task_status
                )
            )
            with structlog.testing.capture_logs() as logs:
                host = await attach_sim_host(tmp_path, nexus_listen="127.0.0.1:23599")
            shutdown.set()
    assert host.nexus_url == nexus_url
    ignored = [e for e in logs if e["event"] == "sim_host_nexus_listen_ignored"]
    assert [(e["log_level"], e["nexus_listen"], e["nexus_url"]) for e in ignored] == [
        ("warning", "127.0.0.1:23599", nexus_url)
    ]


def test_the_hosts_own_error_line_is_what_the_agent_reports(tmp_path: Path) -> None:
    log = tmp_path / "sim-host.log"
    log.write_text("sledagent: an earlier run's line\n")
    start = log.stat().st_size
    with log.open("a") as f:
        f.write('{"event": "x"}\nsledagent: cannot listen on 127.0.0.1:1: address already in use\n')
    assert _last_error(log, start) == "cannot listen on 127.0.0.1:1: address already in use"
    assert _last_error(log, log.stat().st_size) is None
