"""The ``sledagent`` command line (cyclopts, trio backend).

Failures reach the operator as one line each on stderr, ``sledagent: <what is wrong>``,
with an exit status (``_failures``): 2 for a bad flag or config, 1 for a runtime
failure; ``--debug`` (anywhere on the line) adds the traceback of an unexpected error.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Annotated, Literal, NoReturn

import cyclopts
import structlog
import trio
from rich.console import Console

from ._addr import LISTEN_FORMAT, parse_listen
from ._bench_cli import bench
from ._daemon import load_config, run_daemon
from ._failures import (
    EXIT_BROKEN_PIPE,
    EXIT_FAILURE,
    EXIT_USAGE,
    UsageError,
    describe,
    os_reason,
)
from ._flags import PathFlag, PathOrNone
from ._log import configure_logging
from ._zb_cli import zone_bundle
from ._zb_client import remove_partial
from .sim._host import run_sim_host

log = structlog.get_logger("sledagent.cli")

app = cyclopts.App(
    name="sledagent",
    help=(
        "A host agent that runs the lifecycle of the VMs on one sled and collects their "
        "diagnostics. It publishes a VMM's halt to Nexus at once and hands the VMM's zone "
        "to a reaper that bundles and tears it down apart from the VMM's runner.\n\n"
        "Exit status: 0 done, 1 a runtime failure, 2 a bad flag or config."
    ),
    backend="trio",
)
app.command(bench)
app.command(zone_bundle.meta, name="zone-bundle")

LogLevel = Literal["debug", "info", "warning", "error"]
_NO_NEGATIVE = cyclopts.Parameter(negative="", show_default=False)


@app.meta.default
async def _launcher(
    *tokens: Annotated[str, cyclopts.Parameter(show=False, allow_leading_hyphen=True)],
    debug: Annotated[bool, _NO_NEGATIVE] = False,
) -> int:
    """Run a command; turn what it raises into one line per problem and an exit status.

    Parameters
    ----------
    debug
        On an unexpected error, print its traceback as well.
    """
    try:
        result = await app.run_async(
            tokens, exit_on_error=False, print_error=False, result_action="return_value"
        )
    except cyclopts.CycloptsError:
        raise  # a usage error: main() prints it
    except Exception as exc:  # the operator's view of any failure
        lines, status = describe(exc, debug=debug)
        for line in lines:
            print(f"sledagent: {line}", file=sys.stderr)
        return status
    return result if isinstance(result, int) else 0


@asynccontextmanager
async def _shutdown_on_signals(shutdown: trio.Event) -> AsyncIterator[None]:
    """Set ``shutdown`` on SIGINT/SIGTERM while the block runs."""
    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    shutdown.set()
                    return

        nursery.start_soon(watch)
        try:
            yield
        finally:
            nursery.cancel_scope.cancel()


@app.command
async def demo(
    *,
    vmms: int = 10,
    bundle_s: float = 1.0,
    data_dir: PathFlag = Path("demo-data"),
    listen: str = "127.0.0.1:12345",
    log_mb: float = 2,
    exit_after: Annotated[bool, _NO_NEGATIVE] = False,
) -> int:
    """Show the agent at work, in three parts.

    1. On the in-process fake host, ``vmms`` VMMs halt at once under both policies, side
       by side; each bundle takes ``bundle_s`` seconds. Under the reaper every halt
       reaches Nexus at once; under the inline baseline (omicron's behaviour) each waits
       for the bundles ahead of it.
    2. The daemon starts on the embedded default (local zones under ``data_dir``, each
       with a simulated Propolis; a recording Nexus), and a short scenario is driven
       against its HTTP API as Nexus would: three VMMs are registered, run, stopped, and
       their bundles listed.
    3. One more VMM is run, and the agent is stopped and started again (as for an
       upgrade): the VMM is still running, at the same generation, on the same simulated
       Propolis (its log kept growing), and Nexus heard nothing. The daemon then keeps
       running until Ctrl-C (the guest too, in the sim host, for the next start).

    Parameters
    ----------
    vmms
        Number of VMMs to halt at once in part 1 (>= 1).
    bundle_s
        Simulated duration of one bundle in part 1, in seconds (> 0).
    data_dir
        Where the daemon keeps zones and bundles.
    listen
        Address of the daemon's API, host:port (if the port is taken, a free one is used).
    log_mb
        MiB of logs seeded in each zone of part 2 (>= 0).
    exit_after
        Stop the daemon once the scenario is done instead of serving until Ctrl-C.
    """
    from ._demo import run_demo  # the benchmark and the scenario: only for this command

    if vmms < 1 or bundle_s <= 0 or log_mb < 0:
        raise UsageError("demo: --vmms must be >= 1, --bundle-s > 0 and --log-mb >= 0")
    _check_listen("--listen", listen)
    shutdown = trio.Event()
    async with _shutdown_on_signals(shutdown):
        await run_demo(
            vmms=vmms,
            bundle_s=bundle_s,
            data_dir=data_dir,
            listen=listen,
            log_mb=log_mb,
            exit_after=exit_after,
            shutdown=shutdown,
        )
    return 0


@app.command
async def run(
    *,
    config: PathOrNone = None,
    listen: str | None = None,
    data_dir: PathOrNone = None,
    nexus: str | None = None,
    log_level: LogLevel = "info",
) -> int:
    """Run the agent daemon until SIGINT/SIGTERM.

    With no ``--nexus``, a recording Nexus is used (the embedded default); zones are
    local, each with a simulated Propolis. Both run in a ``sledagent sim`` process that
    outlives the agent (a restart costs no simulated guest). On a signal the API stops, the
    reaper drains within ``shutdown_drain_s`` and the process exits 0; what is left is
    picked up by the next start. A bad flag or config exits 2, one line per problem; a
    failure to start (the port in use, a data directory that cannot be created) exits 1.

    Parameters
    ----------
    config
        TOML file (docs/operations.md lists every key); flags override it.
    listen
        Address of the API, host:port (default 127.0.0.1:12345; port 0 picks a free one;
        IPv6 as [::1]:12345).
    data_dir
        Where zones, snapshots, bundles and the cleanup context live (created if missing).
    nexus
        Base URL of Nexus's internal API, http://host:port (default: a recording Nexus
        in this process).
    log_level
        Least severe log lines written to stderr (debug adds one line per API request).
    """
    configure_logging(level=log_level)
    flags = {"listen": listen, "data_dir": data_dir, "nexus_url": nexus}
    cfg = await trio.to_thread.run_sync(partial(load_config, config, flags=flags))
    shutdown = trio.Event()
    serving = False
    try:
        async with _shutdown_on_signals(shutdown), trio.open_nursery() as nursery:
            info = await nursery.start(run_daemon, cfg, shutdown)
            serving = True
            print(f"sledagent listening on {info.api_url} (Nexus: {info.nexus_url})", flush=True)
            await shutdown.wait()
    except Exception:
        if serving:  # a crash while serving: the traceback belongs in the log
            log.exception("daemon_failed")
        raise
    return 0


def _check_listen(flag: str, listen: str) -> None:
    try:
        parse_listen(listen)
    except ValueError:
        raise UsageError(f"{flag}: expected {LISTEN_FORMAT}, got {listen!r}") from None


@app.command
async def sim(
    *,
    nexus_listen: str = "127.0.0.1:0",
    fleet_listen: str = "127.0.0.1:0",
    propolis_listen: str = "127.0.0.1:0",
    state_file: PathOrNone = None,
    idle_exit_s: float | None = None,
) -> int:
    """Run the simulated peers in this process: a recording Nexus and a Propolis fleet.

    Prints ``nexus URL`` and ``fleet URL``; run an agent with ``--nexus URL`` and, in its
    config, ``propolis = "remote"`` and ``sim_fleet_url = "URL"`` (the fleet's). Stops on
    SIGINT/SIGTERM.

    Parameters
    ----------
    nexus_listen
        Address of the recording Nexus, host:port (port 0: any free one).
    fleet_listen
        Address of the fleet controller, host:port (port 0: any free one).
    propolis_listen
        Address of each simulated Propolis, host:port: port 0, any free one; another
        port P, the first free one from P up (one per zone).
    state_file
        Write ``{"pid", "nexus_url", "fleet_url"}`` here once serving (an agent's
        embedded default finds its simulated host so; removed at exit).
    idle_exit_s
        Exit once no simulated Propolis has run and no agent renewed its lease for this
        many seconds (default: run until a signal).
    """
    for flag, value in (
        ("--nexus-listen", nexus_listen),
        ("--fleet-listen", fleet_listen),
        ("--propolis-listen", propolis_listen),
    ):
        _check_listen(flag, value)
    configure_logging(level="warning")
    shutdown = trio.Event()
    async with _shutdown_on_signals(shutdown), trio.open_nursery() as nursery:
        nexus_url, fleet_url = await nursery.start(
            lambda task_status: run_sim_host(
                nexus_listen=nexus_listen, fleet_listen=fleet_listen,
                propolis_listen=propolis_listen, shutdown=shutdown,
                state_file=state_file, idle_exit_s=idle_exit_s, task_status=task_status,
            )
        )  # fmt: skip
        print(f"nexus {nexus_url}\nfleet {fleet_url}", flush=True)
    return 0


def _quiet_stdout() -> None:
    """stdout's reader left (``| head``): drop whatever is still buffered, silently."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


class _Console(Console):
    """rich's console exits 1 when stdout's reader leaves; we exit as a Unix tool does."""

    def on_broken_pipe(self) -> None:
        raise BrokenPipeError


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """The ``sledagent`` entry point: exits with the command's status."""
    tokens = list(sys.argv[1:] if argv is None else argv)
    try:
        result = app.meta(
            tokens,
            console=_Console(),
            exit_on_error=False,
            print_error=False,
            result_action="return_value",
        )
        status = result if isinstance(result, int) else 0
        sys.stdout.flush()
    except cyclopts.CycloptsError as exc:
        message = " ".join(str(exc).split())
        unused = re.fullmatch(r"Unused Tokens: \[(.*)\]\.?", message)
        if unused:  # cyclopts' words for what clap calls an unexpected argument
            message = f"unexpected argument: {unused[1]}"
        if message.endswith(".") and not message.endswith("..."):
            message = message[:-1]
        print(f"sledagent: {message} (see --help)", file=sys.stderr)
        status = EXIT_USAGE
    except BrokenPipeError:
        status = EXIT_BROKEN_PIPE
    except OSError as exc:  # writing stdout (help, a command's last lines) failed
        print(f"sledagent: cannot write stdout: {os_reason(exc)}", file=sys.stderr)
        status = EXIT_FAILURE
        _quiet_stdout()  # what is still buffered would fail again at exit
    except KeyboardInterrupt:
        status = 128 + signal.SIGINT
    finally:
        remove_partial()  # a download's temporary file, whatever ended the command
    if status == EXIT_BROKEN_PIPE:
        _quiet_stdout()
    sys.exit(status)
