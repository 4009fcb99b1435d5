"""``sledagent zone-bundle``: omicron's ``zone-bundle`` verbs, against a running agent.

Verbs, aliases and flags are omicron's (sled-agent/src/bin/zone-bundle.rs); ours stay as
aliases (the map is in docs/operations.md). Beyond omicron: ``create`` (a bundle job with
progress), ``bundle-all`` (omicron's, since removed there), ``quarantine`` (the files in
the debug directories that are not whole bundles), ``--json`` on the reading verbs (the
API's answer as is), ``--url``. The global flags (``--host``, ``--port``, ``--url``,
``--log-level``) go before or after the verb. A verb is a function registered on
``zone_bundle``; it reads the agent through ``_agent()`` and prints with ``_out``.
"""

from __future__ import annotations

import contextvars
import json
import sys
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

import cyclopts
import trio
from rich.console import Console

from ._bundle_all import bundle_all_zones, bundle_zone, default_output, download_progress
from ._failures import CommandFailed, UsageError, os_reason
from ._flags import HostOrNone, PathOrNone, ZoneName, non_empty_path
from ._log import configure_logging
from ._wire import (
    BundleUtilization,
    CleanupContext,
    CleanupCount,
    QuarantinedFile,
    ZoneBundleMetadata,
)
from ._zb_client import DEFAULT_PORT, AgentClient, Target, check_uuid, resolve
from ._zb_format import (
    LIST_DEFAULT,
    LIST_FIELDS,
    UTILIZATION_FIELDS,
    bundle_lines,
    cleanup_lines,
    context_lines,
    human_bytes,
    parse_fields,
    period_body,
    priority_body,
    storage_limit_body,
    utilization_lines,
)

zone_bundle = cyclopts.App(name="zone-bundle")
_target: contextvars.ContextVar[Target | None] = contextvars.ContextVar("target", default=None)
Parseable = Annotated[
    bool,
    cyclopts.Parameter(
        name=["--parseable", "-p"],
        negative="",
        show_default=False,
        help="Comma-separated values, no header.",
    ),
]
Json = Annotated[
    bool,
    cyclopts.Parameter(negative="", show_default=False, help="The agent's JSON answer, as is."),
]
LogLevel = Literal["critical", "error", "warning", "warn", "info", "debug", "trace"]
_LEVELS = {"critical": "critical", "warn": "warning", "trace": "debug"}


@zone_bundle.meta.default
async def _zone_bundle(
    *tokens: Annotated[str, cyclopts.Parameter(show=False, allow_leading_hyphen=True)],
    host: HostOrNone = None,
    port: int | None = None,
    url: str | None = None,
    log_level: LogLevel = "warning",
) -> int:
    """Operate on a running agent's zone bundles, as omicron's zone-bundle does.

    Zone bundles are the collected state of a zone: its processes, its logs and the
    system it ran on. Exit status: 0 done, 1 the agent failed or refused, 2 a bad flag.

    Parameters
    ----------
    host
        The agent's address, IPv6 or IPv4 (default ::1, then 127.0.0.1 if nothing
        answers on ::1).
    port
        The agent's TCP port, 1-65535 (default 12345).
    url
        The agent's base URL, http://host:port (instead of --host and --port).
    log_level
        Least severe log lines on stderr (debug: every request, with the agent's
        request id).
    """
    configure_logging(json=False, level=_LEVELS.get(log_level, log_level))
    if url is not None and (host is not None or port is not None):
        raise UsageError("--url names the agent: give it or --host/--port, not both")
    _target.set(Target(url=url, host=host, port=DEFAULT_PORT if port is None else port))
    result = await zone_bundle.run_async(
        tokens, exit_on_error=False, print_error=False, result_action="return_value"
    )
    return result if isinstance(result, int) else 0


@asynccontextmanager
async def _agent() -> AsyncIterator[AgentClient]:
    async with AgentClient(await resolve(_target.get() or Target())) as agent:
        yield agent


def _out(lines: Iterable[str]) -> None:
    """Print to stdout; a write error (a full disk, a closed device) is one line, exit
    status 1 (a closed pipe stays the quiet 141)."""
    try:
        for line in lines:
            print(line)
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise CommandFailed(f"cannot write stdout: {os_reason(exc)}") from None


def _json(obj: Any) -> None:
    _out([json.dumps(obj, indent=2)])


@zone_bundle.command(name="list-zones")
async def list_zones() -> None:
    """List the zones available for collecting bundles from."""
    async with _agent() as agent:
        _out(await agent.answer("GET", "/zones", list[str]))


@zone_bundle.command(name="list", alias="ls")
async def list_bundles(
    filter: str | None = None,
    *,
    parseable: Parseable = False,
    fields: Annotated[
        list[str] | None, cyclopts.Parameter(name=["--fields", "-o"], negative="")
    ] = None,
    json: Json = False,
) -> None:
    """List existing bundles for a zone or all zones.

    Parameters
    ----------
    filter
        Only bundles of zones whose name contains this substring.
    fields
        Fields to print, a comma list of zone-name, bundle-id, time-created, cause,
        version (default zone-name,bundle-id,time-created).
    """
    chosen = parse_fields("--fields", fields, LIST_FIELDS) or list(LIST_DEFAULT)
    params = {"filter": filter} if filter else None
    async with _agent() as agent:
        bundles = await agent.answer(
            "GET", "/zones/bundles", list[ZoneBundleMetadata], params=params
        )
    if json:
        _json(bundles)
    else:
        _out(bundle_lines(bundles, chosen, parseable=parseable))


def _check_output(output: Path) -> None:
    if not output.parent.is_dir():
        raise UsageError(f"--output {output}: directory {output.parent} does not exist")
    if output.is_dir():
        raise UsageError(f"--output {output}: is a directory")


@zone_bundle.command
async def get(
    zone_name: ZoneName,
    /,
    bundle_id: str,
    *,
    output: Annotated[
        Path | None, cyclopts.Parameter(allow_leading_hyphen=True, converter=non_empty_path)
    ] = None,
) -> None:
    """Get a zone bundle from the agent, streamed to a file.

    Parameters
    ----------
    zone_name
        The zone whose bundle to fetch.
    bundle_id
        The bundle's ID, a UUID: --bundle-id ID (omicron's form), or after the zone name.
    output
        The file to write (default BUNDLE-ID.tar.gz in this directory; - for stdout).
        Written under a temporary name and renamed once complete.
    """
    check_uuid("bundle_id", bundle_id)
    to_stdout = output == Path("-")
    target = None if to_stdout else (output or Path(f"{bundle_id}.tar.gz"))
    if target is not None:
        await trio.to_thread.run_sync(_check_output, target)
    console = Console(stderr=True)
    async with _agent() as agent:
        with download_progress(console, f"{zone_name}/{bundle_id}") as progress:
            written = await agent.download(
                f"/zones/bundles/{zone_name}/{bundle_id}", target, progress
            )
    if target is not None:
        console.print(f"wrote {target} ({written} bytes)", highlight=False, soft_wrap=True)


@zone_bundle.command(name="delete", alias=["del", "rm"])
async def delete(zone_name: ZoneName, /, bundle_id: str) -> None:
    """Delete a zone bundle (every copy of it).

    Parameters
    ----------
    zone_name
        The zone whose bundle to delete.
    bundle_id
        The bundle's ID, a UUID.
    """
    check_uuid("bundle_id", bundle_id)
    async with _agent() as agent:
        await agent.call("DELETE", f"/zones/bundles/{zone_name}/{bundle_id}")


@zone_bundle.command(name="cleanup-context", alias="context")
async def cleanup_context(*, json: Json = False) -> None:
    """Fetch the zone bundle cleanup context: the period of automatic cleanups, the
    priority order of bundles, and the storage limit."""
    async with _agent() as agent:
        ctx = await agent.answer("GET", "/zones/bundle-cleanup/context", CleanupContext)
    if json:
        _json(ctx)
    else:
        _out(context_lines(ctx))


@zone_bundle.command(name="set-cleanup-context", alias="set-context")
async def set_cleanup_context(
    *,
    period: Annotated[str | None, cyclopts.Parameter(name=["--period", "--period-s"])] = None,
    priority: Annotated[
        list[str] | None, cyclopts.Parameter(negative="", consume_multiple=False, metavar="DIM,DIM")
    ] = None,
    storage_limit: int | None = None,
    json: Json = False,
) -> None:
    """Set parameters of the zone bundle cleanup context (at least one); prints the
    context that results.

    Parameters
    ----------
    period
        How often automatic cleanup runs: seconds (omicron's form) or a duration such as
        10m, 1h, 1h30m; from 60 s to 24 h.
    priority
        The order bundles are compared in to choose which go first: time,cause or
        cause,time (a comma list naming each once; as omicron's, the flag may also be
        repeated: --priority time --priority cause).
    storage_limit
        The share of the dataset quota bundles may use, a percentage from 1 to 50.
    """
    body: dict[str, Any] = {}
    if period is not None:
        body["period"] = period_body(period)
    if priority is not None:
        body["priority"] = priority_body(priority)
    if storage_limit is not None:
        body["storage_limit"] = storage_limit_body(storage_limit)
    if not body:
        raise UsageError(
            "set-cleanup-context: give at least one of --period, --priority, --storage-limit"
        )
    async with _agent() as agent:
        await agent.call("PUT", "/zones/bundle-cleanup/context", json=body)
        ctx = await agent.answer("GET", "/zones/bundle-cleanup/context", CleanupContext)
    if json:
        _json(ctx)
    else:
        _out(context_lines(ctx))


@zone_bundle.command
async def utilization(
    *,
    parseable: Parseable = False,
    fields: Annotated[
        list[str] | None, cyclopts.Parameter(name=["--fields", "-o"], negative="")
    ] = None,
    json: Json = False,
) -> None:
    """Return the utilization of the directories bundles are kept in: bytes used, bytes
    bundles may use (the storage limit's share of the quota), the quota, and percentages.

    Parameters
    ----------
    fields
        Fields to print, a comma list of directory, bytes-used, bytes-available,
        dataset-quota, pct-available, pct-quota (default: all).
    """
    chosen = parse_fields("--fields", fields, UTILIZATION_FIELDS) or list(UTILIZATION_FIELDS)
    async with _agent() as agent:
        by_dir = await agent.answer(
            "GET", "/zones/bundle-cleanup/utilization", dict[str, BundleUtilization]
        )
    if json:
        _json(by_dir)
    else:
        _out(utilization_lines(by_dir, chosen, parseable=parseable))


@zone_bundle.command
async def cleanup(*, parseable: Parseable = False, json: Json = False) -> None:
    """Trigger a cleanup of low-priority zone bundles now; shows what was removed per
    directory (bundles and bytes)."""
    async with _agent() as agent:
        removed = await agent.answer("POST", "/zones/bundle-cleanup", dict[str, CleanupCount])
    if json:
        _json(removed)
    else:
        _out(cleanup_lines(removed, parseable=parseable))


@zone_bundle.command
async def quarantine(*, parseable: Parseable = False, json: Json = False) -> None:
    """List the files in the debug directories that are not whole bundles (unreadable,
    truncated...): moved to <debug_dir>/.quarantine/, counted in utilization, removed
    first by cleanup. One line each: size, when, where it was found, why."""
    async with _agent() as agent:
        items = await agent.answer("GET", "/zones/bundle-cleanup/quarantine", list[QuarantinedFile])
    if json:
        _json(items)
        return
    if parseable:
        _out(
            f"{q['bytes']},{q['time_quarantined']},{q['original_path']},{q['reason']}"
            for q in items
        )
        return
    _out(["SIZE       QUARANTINED                       FOUND AT  (WHY)"])
    _out(
        f"{human_bytes(q['bytes']):<10} {q['time_quarantined']:<33} {q['original_path']}"
        f"  ({q['reason']})"
        for q in items
    )


@zone_bundle.command
async def create(zone_name: ZoneName, /) -> None:
    """Bundle a live zone now (cause "other"), showing the job's progress; prints the zone
    and the new bundle's ID. Ours: omicron removed explicit bundles.

    Parameters
    ----------
    zone_name
        A live zone (see list-zones).
    """
    async with _agent() as agent:
        meta = await bundle_zone(agent, zone_name, Console(stderr=True))
    _out([f"{zone_name}  {meta['id']['bundle_id']}"])


@zone_bundle.command(name="bundle-all")
async def bundle_all(
    *,
    output: PathOrNone = None,
    verbose: Annotated[
        bool, cyclopts.Parameter(name=["--verbose", "-v"], negative="", show_default=False)
    ] = False,
) -> int:
    """Bundle every live zone and download each bundle into one tarball (omicron's
    bundle-all, which it has since removed), with progress. Zones that appear meanwhile
    are bundled too. Exit status 1 if any zone could not be bundled (the others are kept).

    Parameters
    ----------
    output
        The tarball to write, with ZONE/BUNDLE-ID.tar.gz per zone (default
        HOSTNAME-YYYY-MM-DDTHH-MM-SS.tar.gz in this directory, local time).
    verbose
        Print each bundle as it is added.
    """
    target = output or default_output()
    await trio.to_thread.run_sync(_check_output, target)
    async with _agent() as agent:
        report = await bundle_all_zones(agent, target, Console(stderr=True), verbose=verbose)
    for zone, reason in report.skipped.items():
        print(f"sledagent: {zone}: skipped: {reason}", file=sys.stderr)
    for zone, reason in report.failed.items():
        print(f"sledagent: {zone}: not bundled: {reason}", file=sys.stderr)
    print(f"{target}: {len(report.added)} bundles", file=sys.stderr)
    return 1 if report.failed else 0


__all__ = ["zone_bundle"]
