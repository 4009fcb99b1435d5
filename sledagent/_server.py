"""Serve the API with hypercorn's trio worker, inside the agent's nursery."""

from __future__ import annotations

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from starlette.applications import Starlette

DEFAULT_LISTEN = "127.0.0.1:12345"


async def serve_api(
    app: Starlette,
    *,
    listen: str = DEFAULT_LISTEN,
    shutdown: trio.Event,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``listen`` until ``shutdown`` is set; reports the bound URLs.

    Started with ``await nursery.start(...)``: the caller learns the real port (use
    port 0 in tests). On ``shutdown`` hypercorn stops accepting and lets requests in
    flight finish.
    """
    config = Config()
    config.bind = [listen]
    config.accesslog = None
    config.errorlog = None  # structlog is our log; hypercorn's banner is noise
    config.graceful_timeout = 5.0
    # Starlette and hypercorn spell the ASGI 3 callable with different type aliases.
    await serve(app, config, shutdown_trigger=shutdown.wait, task_status=task_status)  # type: ignore[arg-type]
