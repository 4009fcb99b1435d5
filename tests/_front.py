"""Start the API server with a front thread (``serve_api(front=True)``), for tests."""

from __future__ import annotations

import trio

from sledagent._http import ASGIApp, HttpLimits
from sledagent._server import serve_api


async def serve_with_front(
    app: ASGIApp,
    *,
    stop: trio.Event,
    until: trio.Event | None = None,
    limits: HttpLimits | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """``serve_api`` on a free loopback port with a front until ``until`` (None: to the
    end); start it with ``nursery.start``: its URLs."""
    await serve_api(
        app,
        listen="127.0.0.1:0",
        shutdown=stop,
        limits=limits,
        announce=False,
        front=True,
        front_until=until,
        task_status=task_status,
    )


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])
