"""Helpers for the front tests: the API with a front thread (``serve_api(front=True)``),
and reads made while the agent's trio thread is blocked (thread or process front)."""

from __future__ import annotations

import http.client
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import trio

from sledagent._http import ASGIApp, HttpLimits
from sledagent._server import serve_api

T = TypeVar("T")
DEADLINE_S = 30


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


def http_get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """A blocking ``GET`` on a connection of its own: (status, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE_S)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def while_blocked(fn: Callable[[], T]) -> T:
    """``fn()`` run on a thread of its own while this (the agent's) trio thread is
    blocked, not yielding to its loop, until ``fn`` returns; its result. An answer can
    then only come from a front."""
    result: list[Any] = []
    done = threading.Event()

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as exc:  # handed to the test
            result.append(exc)
        finally:
            done.set()

    threading.Thread(target=run, daemon=True).start()
    assert done.wait(DEADLINE_S), "no answer while the agent's loop was blocked"
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]  # type: ignore[no-any-return]


def kept_alive_on_the_agent(port: int) -> http.client.HTTPConnection:
    """A kept-alive connection the front process has handed to the agent (a request
    that is not a state read moves it there), its first answer read. Blocking: run it
    in a thread."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE_S)
    conn.request("GET", "/no/such/route")  # handed over: the agent's now
    assert conn.getresponse().read()
    return conn
