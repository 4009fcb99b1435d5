"""Serve an ASGI app (the API, the simulators) inside the caller's nursery."""

from __future__ import annotations

import trio

from ._http import ASGIApp, HttpLimits, serve_http

DEFAULT_LISTEN = "127.0.0.1:12345"


async def serve_api(
    app: ASGIApp,
    *,
    listen: str = DEFAULT_LISTEN,
    shutdown: trio.Event,
    limits: HttpLimits | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``listen`` until ``shutdown`` is set; reports the bound URLs.

    Started with ``await nursery.start(...)``: the caller learns the real port (use
    port 0 in tests). On ``shutdown`` the server stops accepting, closes idle
    connections and lets requests in flight finish (``limits.graceful_s``).
    """
    await serve_http(app, listen, shutdown=shutdown, limits=limits, task_status=task_status)
