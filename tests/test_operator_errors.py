"""An operator's first mistakes: bad configs and flags, a port in use, an unusable data
directory. Each is one line on stderr naming what is wrong, no traceback, and exit status
2 (bad config or flag) or 1 (the host refused). The CLI runs as a process, as typed."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
import structlog
import trio

from sledagent._failures import EXIT_FAILURE, EXIT_USAGE, describe

CLI = [sys.executable, "-c", "from sledagent._cli import main; main()"]
LISTEN_EXPECTED = "expected host:port with a port 0..65535 (IPv6 as [::1]:port)"


@attrs.frozen
class Case:
    args: tuple[str, ...]
    line: str  # the whole stderr, one line; {tmp} and {config} are filled in
    status: int
    config: str | None = None  # TOML written to {config} and passed with --config


CASES = [
    # flags
    Case(("run", "--listen", "127.0.0.1"), f'sledagent: --listen: {LISTEN_EXPECTED}, got "127.0.0.1"', 2),
    Case(("run", "--listen", "not-an-address"), f'sledagent: --listen: {LISTEN_EXPECTED}, got "not-an-address"', 2),
    Case(("run", "--listen", "999.1.1.1:1"), f'sledagent: --listen: {LISTEN_EXPECTED}, got "999.1.1.1:1"', 2),
    Case(("run", "--listen", "127.0.0.1:-1"), f'sledagent: --listen: {LISTEN_EXPECTED}, got "127.0.0.1:-1"', 2),
    Case(("run", "--listen", "127.0.0.1:99999"), f'sledagent: --listen: {LISTEN_EXPECTED}, got "127.0.0.1:99999"', 2),
    Case(("run", "--nexus", "not-a-url"), 'sledagent: --nexus: expected an http://host:port URL, got "not-a-url"', 2),
    Case(("run", "--bogus"), "sledagent: Unknown option: --bogus (see --help)", 2),
    Case(("run", "--config", "{tmp}/missing.toml"), "sledagent: --config {tmp}/missing.toml: cannot read: no such file or directory", 2),
    # the config file
    Case(("run",), 'sledagent: {config}: agent.max_zones: expected an integer >= 1, got "many"', 2, '[agent]\nmax_zones = "many"'),
    Case(("run",), "sledagent: {config}: agent.nexus_backoff: expected a table with keys initial_s, max_s, got 3", 2, "[agent]\nnexus_backoff = 3"),
    Case(("run",), 'sledagent: {config}: agent.termination_policy: expected one of "reaper", "inline", got "bogus"', 2, '[agent]\ntermination_policy = "bogus"'),
    Case(("run",), "sledagent: {config}: max_bundle_file_mb: expected an integer >= 1, got -1", 2, "max_bundle_file_mb = -1"),
    Case(("run",), f"sledagent: {{config}}: listen: {LISTEN_EXPECTED}, got 5", 2, "listen = 5"),
    Case(("run",), f'sledagent: {{config}}: listen: {LISTEN_EXPECTED}, got "127.0.0.1:99999"', 2, 'listen = "127.0.0.1:99999"'),
    Case(("run",), 'sledagent: {config}: propolis: expected one of "sim", "sim-inprocess", "remote", "external", got "bogus"', 2, 'propolis = "bogus"'),
    Case(("run",), 'sledagent: {config}: debug_dirs: expected a non-empty list of paths (leave it out for data_dir/debug), got "xy"', 2, 'debug_dirs = "xy"'),
    Case(("run",), "sledagent: {config}: token: expected a non-empty string, got 5", 2, "token = 5"),
    Case(("run",), 'sledagent: {config}: agent.bundle_defunct_zones: expected true or false, got "yes"', 2, '[agent]\nbundle_defunct_zones = "yes"'),
    Case(("run",), "sledagent: {config}: agent.max_zone: unknown key (did you mean max_zones?)", 2, "[agent]\nmax_zone = 3"),
    Case(("run",), "sledagent: {config}: agent.nexus_backoff: max_s (1) must be >= initial_s (5)", 2, "[agent]\nnexus_backoff = {initial_s = 5, max_s = 1}"),
    Case(("run",), 'sledagent: {config}: propolis = "remote" needs sim_fleet_url', 2, 'propolis = "remote"'),
    # a flag overrides the file, and is named when it is the bad one
    Case(("run", "--listen", "x:1:2"), f'sledagent: --listen: {LISTEN_EXPECTED}, got "x:1:2"', 2, 'listen = "127.0.0.1:0"'),
    # the host refuses valid settings: exit 1
    Case(("run", "--listen", "127.0.0.1:0", "--data-dir", "{tmp}/a-file"), "sledagent: data_dir {tmp}/a-file: exists and is not a directory", 1),
    Case(("run", "--listen", "127.0.0.1:0", "--data-dir", "{tmp}/a-file/sub"), "sledagent: data_dir {tmp}/a-file/sub: cannot create: not a directory", 1),
    # zone-bundle flags
    Case(("zone-bundle", "--port", "70000", "ls"), "sledagent: --port: expected a port from 1 to 65535, got 70000", 2),
    Case(("zone-bundle", "--url", "nope", "ls"), 'sledagent: --url: expected an http://host:port URL, got "nope"', 2),
    Case(("zone-bundle", "ls", "-o", "zone-name,size"), 'sledagent: --fields: expected a comma list of zone-name, bundle-id, time-created, cause, version, got "zone-name,size"', 2),
    Case(("zone-bundle", "get", "z", "not-a-uuid"), 'sledagent: bundle_id: expected a UUID, got "not-a-uuid"', 2),
    Case(("zone-bundle", "get", "z", "--bundle-id", "1b4e28ba-2fa1-11d2-883f-0016d3cca427", "--output", "{tmp}/no/such/dir/b.tar.gz"), "sledagent: --output {tmp}/no/such/dir/b.tar.gz: directory {tmp}/no/such/dir does not exist", 2),
    Case(("zone-bundle", "set-context"), "sledagent: set-cleanup-context: give at least one of --period, --priority, --storage-limit", 2),
    Case(("zone-bundle", "set-context", "--period", "10s"), 'sledagent: --period: expected a duration from 60 s to 86400 s (600, 10m, 1h), got "10s"', 2),
    Case(("zone-bundle", "set-context", "--priority", "time,time"), 'sledagent: --priority: expected time,cause or cause,time (each once, most important first), got "time,time"', 2),
    Case(("zone-bundle", "set-context", "--storage-limit", "90"), "sledagent: --storage-limit: expected a percentage of the quota from 1 to 50, got 90", 2),
    Case(("bench", "mass-stop", "--vmms", "0"), 'sledagent: Invalid value "0" for --vmms. Must be >= 1 (see --help)', 2),
    Case(("demo", "--vmms", "0"), "sledagent: demo: --vmms must be >= 1, --bundle-s > 0 and --log-mb >= 0", 2),
    Case(("zone-bundle", "frobnicate"), 'sledagent: Unknown command "frobnicate". Available commands: list-zones, list, ls, get, delete, del, rm, cleanup-context, ... (see --help)', 2),
    Case(("zone-bundle", "delete"), 'sledagent: Command "delete" parameter ZONE_NAME requires an argument (see --help)', 2),
    # empty values: never "the working directory", never "no token"
    Case(("run", "--data-dir", ""), "sledagent: Invalid value for --data-dir: expected a non-empty path (see --help)", 2),
    Case(("run", "--config", ""), "sledagent: Invalid value for --config: expected a non-empty path (see --help)", 2),
    Case(("demo", "--data-dir", " "), "sledagent: Invalid value for --data-dir: expected a non-empty path (see --help)", 2),
    Case(("sim", "--state-file", ""), "sledagent: Invalid value for --state-file: expected a non-empty path (see --help)", 2),
    Case(("zone-bundle", "--host", "", "ls"), "sledagent: Invalid value for --host: expected a non-empty host (see --help)", 2),
    Case(("zone-bundle", "get", "", "--bundle-id", "1b4e28ba-2fa1-11d2-883f-0016d3cca427"), "sledagent: expected a non-empty zone name (ZONE_NAME) (see --help)", 2),
    Case(("zone-bundle", "get", "z", "--bundle-id", "1b4e28ba-2fa1-11d2-883f-0016d3cca427", "--output", ""), "sledagent: Invalid value for --output: expected a non-empty path (see --help)", 2),
    Case(("zone-bundle", "bundle-all", "--output", ""), "sledagent: Invalid value for --output: expected a non-empty path (see --help)", 2),
    Case(("bench", "sweep", "--out-dir", ""), "sledagent: Invalid value for --out-dir: expected a non-empty path (see --help)", 2),
    Case(("run",), 'sledagent: {config}: data_dir: expected a path, got ""', 2, 'data_dir = ""'),
    Case(("run",), 'sledagent: {config}: token: expected a non-empty string, got ""', 2, 'token = ""'),
    Case(("run",), "sledagent: {config}: debug_dirs: expected a non-empty list of paths (leave it out for data_dir/debug), got []", 2, "debug_dirs = []"),
    # every bench's parameters are flags, checked before anything runs
    Case(("bench", "migrate", "--vmms", "0"), 'sledagent: Invalid value "0" for --vmms. Must be >= 1 (see --help)', 2),
    Case(("bench", "load", "--vmms", "-1"), 'sledagent: Invalid value "-1" for --vmms. Must be >= 1 (see --help)', 2),
    Case(("bench", "restart", "--vmms", "0"), 'sledagent: Invalid value "0" for --vmms. Must be >= 1 (see --help)', 2),
    Case(("bench", "scale", "--vmms", "0"), 'sledagent: Invalid value "0" for --vmms. Must be >= 1 (see --help)', 2),
    Case(("bench", "sweep", "--vmms", "10", "0"), 'sledagent: Invalid value "(10, 0)" for --vmms. Must be >= 1 (see --help)', 2),
    Case(("bench", "bundle", "--level", "12"), 'sledagent: Invalid value "12" for --level. Must be <= 9 (see --help)', 2),
    Case(("bench", "faults", "--modes", "down", "bogus"), 'sledagent: Invalid value "bogus" for --modes. Choose from: "down", "503", "slow" (see --help)', 2),
    Case(("bench", "crash", "--signal", "SIGFOO"), "sledagent: Invalid value \"SIGFOO\" for --signal. Expected a signal name such as SIGKILL or SIGTERM (see --help)", 2),
    Case(("bench", "api", "--connections", "0"), 'sledagent: Invalid value "0" for --connections. Must be >= 1 (see --help)', 2),
    Case(("bench", "mass-stop", "--get-timeout-s", "0"), 'sledagent: Invalid value "0.0" for --get-timeout-s. Must be > 0 (see --help)', 2),
    # Nexus's URL: what nothing would honour is refused
    Case(("run", "--nexus", "http://u:p@127.0.0.1:23500/api/v1"), 'sledagent: --nexus: expected an http://host:port URL, got "http://u:p@127.0.0.1:23500/api/v1"', 2),
    Case(("run", "--nexus", "http://127.0.0.1"), 'sledagent: --nexus: expected an http://host:port URL, got "http://127.0.0.1"', 2),
    Case(("run", "--nexus", "http://127.0.0.1:23500/api"), 'sledagent: --nexus: expected an http://host:port URL, got "http://127.0.0.1:23500/api"', 2),
    Case(("run", "--nexus", "http://127.0.0.1:23500?x=1"), 'sledagent: --nexus: expected an http://host:port URL, got "http://127.0.0.1:23500?x=1"', 2),
    Case(("run", "--nexus", "http://127.0.0.1:23500#top"), 'sledagent: --nexus: expected an http://host:port URL, got "http://127.0.0.1:23500#top"', 2),
    Case(("run",), 'sledagent: {config}: nexus_url: expected an http://host:port URL, got "http://admin@[::1]:23500"', 2, 'nexus_url = "http://admin@[::1]:23500"'),
    Case(("zone-bundle", "--url", "http://u:secret@127.0.0.1:1", "ls"), 'sledagent: --url: expected an http://host:port URL, got "http://u:***@127.0.0.1:1"', 2),
]  # fmt: skip


async def _run(argv: list[str], cwd: Path) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if k != "SLEDAGENT_TOKEN"}  # no token
    result = await trio.run_process(
        argv, capture_stdout=True, capture_stderr=True, check=False, cwd=cwd, env=env
    )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


def _argv(case: Case, tmp_path: Path, i: int) -> tuple[list[str], str]:
    """The command line and the expected stderr line of ``case``."""
    (tmp_path / "a-file").write_text("")
    config = tmp_path / f"case-{i}.toml"
    args = [a.format(tmp=tmp_path) for a in case.args]
    if case.config is not None:
        config.write_text(case.config)
        args += ["--config", str(config)]
    return args, case.line.format(tmp=tmp_path, config=config)


@pytest.fixture
def structlog_restored() -> Iterator[None]:
    """``main`` configures logging for the process; give the next test its own back."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


@pytest.mark.parametrize("i", range(len(CASES)), ids=[" ".join(c.args) for c in CASES])
@pytest.mark.usefixtures("structlog_restored")
def test_bad_flags_and_configs_exit_with_one_line_naming_the_problem(
    i: int, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The table, through ``main`` in this process (each case is milliseconds; the
    process itself is checked below on a few of them)."""
    from sledagent._cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SLEDAGENT_TOKEN", raising=False)
    args, line = _argv(CASES[i], tmp_path, i)
    with pytest.raises(SystemExit) as exited:
        main(args)
    out, err = capsys.readouterr()
    assert (exited.value.code, err, out) == (CASES[i].status, line + "\n", "")


async def test_the_cli_process_prints_the_one_line_and_exits_with_its_status(
    tmp_path: Path,
) -> None:
    picked = [0, 6, 8, 15, 22, 29, 33]  # flags, cyclopts, config file, host, zone-bundle, bench
    seen: dict[int, tuple[int, str, str]] = {}

    async def one(i: int) -> None:
        args, _ = _argv(CASES[i], tmp_path, i)
        seen[i] = await _run([*CLI, *args], tmp_path)

    with trio.fail_after(240):
        async with trio.open_nursery() as nursery:
            for i in picked:
                nursery.start_soon(one, i)
    for i in picked:
        _, line = _argv(CASES[i], tmp_path, i)
        assert seen[i] == (CASES[i].status, "", line + "\n"), CASES[i].args


async def test_a_port_in_use_is_one_line_naming_the_address_and_exit_status_1(
    tmp_path: Path,
) -> None:
    with trio.fail_after(60):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        try:
            status, _, stderr = await _run(
                [*CLI, "run", "--listen", f"127.0.0.1:{port}", "--data-dir", str(tmp_path / "d")],
                tmp_path,
            )
        finally:
            for listener in listeners:
                await listener.aclose()
    assert (status, stderr) == (
        1,
        f"sledagent: cannot listen on 127.0.0.1:{port}: address already in use\n",
    )
    # Refused before the startup sweep touched anything: no zones, journal or bundles.
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["debug"]


async def test_the_demo_uses_a_free_port_when_its_port_is_taken(tmp_path: Path) -> None:
    with trio.fail_after(180):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        try:
            status, stdout, stderr = await _run(
                [*CLI, "demo", "--vmms", "2", "--bundle-s", "0.2", "--log-mb", "0.1",
                 "--listen", f"127.0.0.1:{port}", "--data-dir", str(tmp_path / "demo"),
                 "--exit-after"],
                tmp_path,
            )  # fmt: skip
        finally:
            for listener in listeners:
                await listener.aclose()
    assert status == 0, stderr
    assert "The daemon listens on http://127.0.0.1:" in stdout
    assert f"http://127.0.0.1:{port}" not in stdout
    # The ratio is a figure, not a Python dict; each policy's sentence quotes its figures.
    ratio = next(line for line in stdout.splitlines() if line.startswith("inline / reaper"))
    assert "{" not in ratio and (ratio.endswith("x") or "n/a" in ratio), ratio
    assert any(line.startswith("inline (omicron): ") and "GET state p99" in line
               for line in stdout.splitlines())  # fmt: skip
    # The lines to paste are complete commands: no placeholder a shell would misread.
    curl = [line.strip() for line in stdout.splitlines() if line.strip().startswith("curl ")]
    assert curl and not any("<" in line or ">" in line for line in curl), curl
    # Part 3: the agent restarted; its guest did not.
    assert "after the restart: running at generation" in stdout
    assert "(the same as before)" in stdout and "0 updates since the stop" in stdout


def test_an_unexpected_error_is_one_line_and_its_traceback_only_with_debug(
    capsys: pytest.CaptureFixture[str],
) -> None:
    def failing() -> None:
        raise KeyError("boom")

    try:
        failing()
    except KeyError as exc:
        error = exc
    lines, status = describe(ExceptionGroup("nursery", [error]))
    assert status == EXIT_FAILURE
    assert lines == ["internal error: KeyError: 'boom' (run with --debug for the traceback)"]
    assert capsys.readouterr().err == ""
    lines, _ = describe(error, debug=True)
    assert lines == ["internal error: KeyError: 'boom'"]
    assert "Traceback" in capsys.readouterr().err


def test_a_closed_pipe_is_quiet() -> None:
    lines, status = describe(ExceptionGroup("g", [BrokenPipeError()]))
    assert (lines, status) == ([], 141)


@pytest.mark.usefixtures("structlog_restored")
def test_an_empty_token_in_the_environment_is_refused_not_taken_for_no_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from sledagent._cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SLEDAGENT_TOKEN", "")
    with pytest.raises(SystemExit) as exited:
        main(["run", "--listen", "127.0.0.1:0"])
    assert (exited.value.code, capsys.readouterr().err) == (
        2,
        "sledagent: $SLEDAGENT_TOKEN: expected a non-empty string (unset it to run without "
        "a token)\n",
    )
    assert list(tmp_path.iterdir()) == []  # refused before the data directory is made


def test_config_and_runtime_failures_together_exit_with_the_config_status() -> None:
    from sledagent._failures import ConfigError, StartupError

    lines, status = describe(ExceptionGroup("g", [StartupError("a"), ConfigError("b")]))
    assert (lines, status) == (["a", "b"], EXIT_USAGE)
