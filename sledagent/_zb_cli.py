"""``sledagent zone-bundle``: omicron's zone-bundle verbs, against a running agent's API."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import cyclopts
import httpx
import trio
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn

zone_bundle = cyclopts.App(
    name="zone-bundle",
    help="Zone bundles on a running agent: list, fetch, delete, create; cleanup settings; "
    "quarantine.",
)

Url = Annotated[str, cyclopts.Parameter(name="--url", help="The agent's API.")]
DEFAULT_URL = "http://127.0.0.1:12345"


def _client(url: str) -> httpx.AsyncClient:
    token = os.environ.get("SLEDAGENT_TOKEN")
    headers = {"authorization": f"Bearer {token}"} if token else None
    return httpx.AsyncClient(base_url=url, headers=headers, timeout=60)


async def _call(url: str, method: str, path: str, **kw: Any) -> httpx.Response:
    async with _client(url) as client:
        try:
            response = await client.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise SystemExit(f"sledagent: cannot reach the agent at {url}: {exc}") from None
    if response.status_code >= 400:
        try:
            message = response.json()["message"]
        except (ValueError, KeyError):
            message = response.text
        raise SystemExit(f"sledagent: {method} {path}: {response.status_code}: {message}")
    return response


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2))


@zone_bundle.command(name="list-zones")
async def list_zones(*, url: Url = DEFAULT_URL) -> None:
    """List the zones on the sled."""
    for name in (await _call(url, "GET", "/zones")).json():
        print(name)


@zone_bundle.command(name="ls")
async def ls(filter: str | None = None, *, url: Url = DEFAULT_URL) -> None:
    """List bundles, optionally only of zones whose name contains FILTER."""
    params = {"filter": filter} if filter else None
    for b in (await _call(url, "GET", "/zones/bundles", params=params)).json():
        print(f"{b['id']['zone_name']}  {b['id']['bundle_id']}  {b['time_created']}  {b['cause']}")


@zone_bundle.command
async def get(
    zone_name: str, bundle_id: str, *, output: Path | None = None, url: Url = DEFAULT_URL
) -> None:
    """Download a bundle (to OUTPUT, default ``<bundle_id>.tar.gz``)."""
    target = output or Path(f"{bundle_id}.tar.gz")
    response = await _call(url, "GET", f"/zones/bundles/{zone_name}/{bundle_id}")
    await trio.Path(target).write_bytes(response.content)
    print(f"wrote {target} ({len(response.content)} bytes)")


@zone_bundle.command
async def rm(zone_name: str, bundle_id: str, *, url: Url = DEFAULT_URL) -> None:
    """Delete a bundle (every copy)."""
    await _call(url, "DELETE", f"/zones/bundles/{zone_name}/{bundle_id}")
    print(f"deleted {zone_name}/{bundle_id}")


@zone_bundle.command
async def context(*, url: Url = DEFAULT_URL) -> None:
    """Show the cleanup context (period, priority, storage limit)."""
    _print((await _call(url, "GET", "/zones/bundle-cleanup/context")).json())


@zone_bundle.command(name="set-context")
async def set_context(
    *,
    period_s: int | None = None,
    priority: list[Literal["cause", "time"]] | None = None,
    storage_limit: int | None = None,
    url: Url = DEFAULT_URL,
) -> None:
    """Update the cleanup context; only the given fields change."""
    body: dict[str, Any] = {}
    if period_s is not None:
        body["period"] = {"secs": period_s, "nanos": 0}
    if priority is not None:
        body["priority"] = priority
    if storage_limit is not None:
        body["storage_limit"] = storage_limit
    await _call(url, "PUT", "/zones/bundle-cleanup/context", json=body)
    _print((await _call(url, "GET", "/zones/bundle-cleanup/context")).json())


@zone_bundle.command
async def utilization(*, url: Url = DEFAULT_URL) -> None:
    """Show, per debug directory, the quota, the bytes available to bundles and used."""
    _print((await _call(url, "GET", "/zones/bundle-cleanup/utilization")).json())


@zone_bundle.command
async def cleanup(*, url: Url = DEFAULT_URL) -> None:
    """Apply retention now; shows what was removed per debug directory."""
    _print((await _call(url, "POST", "/zones/bundle-cleanup")).json())


@zone_bundle.command
async def quarantine(
    *,
    json_output: Annotated[
        bool, cyclopts.Parameter(name="--json", negative=(), help="Print the JSON answer.")
    ] = False,
    url: Url = DEFAULT_URL,
) -> None:
    """List the files in the debug directories that are not whole bundles (unreadable,
    truncated...): moved to <debug_dir>/.quarantine/, counted in utilization, removed
    first by cleanup. One line each: bytes, when, where it was found, why."""
    items = (await _call(url, "GET", "/zones/bundle-cleanup/quarantine")).json()
    if json_output:
        _print(items)
        return
    for q in items:
        print(f"{q['bytes']:>12}  {q['time_quarantined']}  {q['original_path']}  ({q['reason']})")
    total = sum(q["bytes"] for q in items)
    print(f"{len(items)} file(s), {total} bytes in quarantine", file=sys.stderr)


@zone_bundle.command
async def create(zone_name: str, *, url: Url = DEFAULT_URL) -> None:
    """Bundle a live zone now (cause ``other``), showing the job's progress."""
    job = (await _call(url, "POST", f"/zones/bundles/{zone_name}")).json()
    console = Console(stderr=True)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), console=console) as progress:
        task = progress.add_task(f"{zone_name}: {job['state']}")
        while job["state"] not in ("done", "failed"):
            await trio.sleep(0.2)
            job = (await _call(url, "GET", f"/zones/bundle-jobs/{job['job_id']}")).json()
            progress.update(task, description=f"{zone_name}: {job['state']}")
    if job["state"] == "failed":
        raise SystemExit(f"sledagent: bundle failed: {job['error']}")
    print(f"{zone_name}  {job['bundle']['id']['bundle_id']}")


__all__ = ["zone_bundle"]
