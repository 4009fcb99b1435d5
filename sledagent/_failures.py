"""What an operator sees when a command fails: one line each, and an exit status.

Exit statuses (docs/operations.md): 0 done; 1 a runtime failure (the port is in use, the
data directory cannot be created, the agent cannot be reached or refused the request);
2 a bad config or flag (the CLI's usage errors too); 141 stdout closed by its reader
(``| head``), quietly, as other Unix tools. A bug is one line naming the exception and
``--debug``, which prints the traceback as well.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import traceback
from collections.abc import Iterator

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE


class OperatorError(Exception):
    """A failure an operator can act on: its message is the whole story, one line per
    problem (no traceback). ``exit_status`` is what the CLI exits with."""

    exit_status = EXIT_FAILURE

    def lines(self) -> list[str]:
        return str(self).splitlines() or [type(self).__name__]


class ConfigError(OperatorError, ValueError):
    """The configuration file or flags are invalid; each line names the key (or flag),
    the value and what is allowed (``agent.max_zones: expected an integer >= 1, got
    "many"``). Exit status 2."""

    exit_status = EXIT_USAGE

    def __init__(self, *problems: str) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


class UsageError(OperatorError, ValueError):
    """A command-line value the command cannot use (exit status 2)."""

    exit_status = EXIT_USAGE


class StartupError(OperatorError):
    """The daemon cannot start on this host with valid settings (exit status 1)."""


class ListenError(StartupError):
    """The API (or an embedded server) cannot listen on ``address``: in use, or not an
    address of this host."""

    def __init__(self, address: str, reason: str) -> None:
        super().__init__(f"cannot listen on {address}: {reason}")
        self.address = address


class CommandFailed(OperatorError):
    """A client command failed at run time (agent unreachable, request refused)."""


def leaves(exc: BaseException) -> Iterator[BaseException]:
    """The exceptions inside (nested) exception groups, in order."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from leaves(inner)
    else:
        yield exc


def os_reason(exc: OSError) -> str:
    """``[Errno 98] Address already in use`` -> ``address already in use`` (the errno's
    own words: wrappers such as trio's put more in ``strerror``)."""
    text = (os.strerror(exc.errno) if exc.errno else exc.strerror) or str(exc)
    text = text or type(exc).__name__
    return text[:1].lower() + text[1:]


#: getaddrinfo's answers that mean the name has no address (not a network failure).
_NO_NAME = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}


def underlying_reason(exc: BaseException, *, host: str | None = None) -> str:
    """The OS's reason under a library's wrapping (``connection refused``), if there is
    one: trio's "all attempts to connect ... failed" keeps each attempt's error in an
    exception group as its cause; httpx chains the transport's error. A name lookup's
    failure (``socket.gaierror``, whose codes are not errnos) says so, naming ``host``:
    ``name not-a-host does not resolve``."""
    todo: list[BaseException] = [exc]
    while todo:
        seen = todo.pop(0)
        if isinstance(seen, socket.gaierror):
            name = f"name {host}" if host else "the name"
            if seen.errno in _NO_NAME:
                return f"{name} does not resolve"
            return f"{name} cannot be resolved: {_gai(seen)}"
        if isinstance(seen, OSError) and seen.errno:
            return os_reason(seen)
        if isinstance(seen, BaseExceptionGroup):
            todo.extend(seen.exceptions)
        todo.extend(e for e in (seen.__cause__, seen.__context__) if e is not None)
    text = str(exc) or type(exc).__name__
    return re.sub(r"^\[Errno -?\d+\]\s*", "", text)


def _gai(exc: socket.gaierror) -> str:
    text = exc.strerror or str(exc)
    return text[:1].lower() + text[1:]


def describe(exc: BaseException, *, debug: bool = False) -> tuple[list[str], int]:
    """The lines to print (without the ``sledagent:`` prefix) and the exit status for a
    command that raised ``exc``. An empty list: print nothing."""
    found = list(leaves(exc))
    if found and all(isinstance(e, BrokenPipeError) for e in found):
        return [], EXIT_BROKEN_PIPE
    known = [e for e in found if isinstance(e, OperatorError)]
    if known and len(known) == len(found):
        lines = [line for e in known for line in e.lines()]
        return lines, max(e.exit_status for e in known)
    if debug:
        traceback.print_exception(exc)
    bugs = [e for e in found if not isinstance(e, OperatorError | BrokenPipeError)]
    first = bugs[0] if bugs else exc
    hint = "" if debug else " (run with --debug for the traceback)"
    return [f"internal error: {type(first).__name__}: {first}{hint}"], EXIT_FAILURE
