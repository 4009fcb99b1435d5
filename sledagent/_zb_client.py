"""The agent's API as ``sledagent zone-bundle`` uses it: httpx, a 300 s timeout
(omicron's ``zone-bundle``: bundles take a while to make and to move), errors as one line.

Which agent: ``--url``, or ``http://[--host]:--port``. With no ``--host``, omicron's
default ``::1``, and ``127.0.0.1`` (our daemon's default address) when nothing answers
on ``::1``. The token comes from ``$SLEDAGENT_TOKEN``.

Every failure is a ``CommandFailed`` (exit status 1) naming the request, the agent's
status, error code and message, and the request id the agent logged it under.
"""

from __future__ import annotations

import json
import os
import stat
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import msgspec
import structlog
import trio

from ._addr import check_http_url
from ._failures import CommandFailed, UsageError, os_reason, underlying_reason

log = structlog.get_logger("sledagent.zone_bundle")

TOKEN_ENV = "SLEDAGENT_TOKEN"
DEFAULT_PORT = 12345
DEFAULT_HOSTS = ("::1", "127.0.0.1")
#: omicron's zone-bundle client timeout, per request (connect, each read, each write).
TIMEOUT_S = 300.0
_PROBE_S = 2.0
_CHUNK = 1 << 20


@attrs.frozen
class Target:
    """Where the agent is, as the global flags said."""

    url: str | None = None
    host: str | None = None
    port: int = DEFAULT_PORT


def _url_for(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def check_uuid(name: str, value: str) -> str:
    """``UsageError`` unless ``value`` is a UUID (a bundle's ID)."""
    try:
        uuid.UUID(value)
    except ValueError:
        raise UsageError(f"{name}: expected a UUID, got {json.dumps(value)}") from None
    return value


async def _answers(host: str, port: int) -> bool:
    with trio.move_on_after(_PROBE_S):
        try:
            stream = await trio.open_tcp_stream(host, port)
        except OSError:
            return False
        await stream.aclose()
        return True
    return False


async def resolve(target: Target) -> str:
    """The agent's base URL (see the module docstring); ``UsageError`` for a bad one."""
    if target.url is not None:
        try:
            return check_http_url(target.url).rstrip("/")
        except ValueError as exc:
            raise UsageError(f"--url: {exc}") from None
    if not 0 < target.port <= 65535:
        raise UsageError(f"--port: expected a port from 1 to 65535, got {target.port}")
    if target.host is not None:
        return _url_for(target.host, target.port)
    for host in DEFAULT_HOSTS:
        if await _answers(host, target.port):
            return _url_for(host, target.port)
    return _url_for(DEFAULT_HOSTS[0], target.port)  # the error will name it


def _failure(response: httpx.Response, what: str) -> CommandFailed:
    code, message, request_id = (
        None,
        response.text.strip()[:200],
        response.headers.get("x-request-id"),
    )
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        code = body.get("error_code")
        message = str(body.get("message", message))
        request_id = body.get("request_id") or request_id
    line = f"{what}: {response.status_code}"
    if code:
        line += f" {code}"
    line += f": {message}" if message else ""
    if response.status_code == 401:
        line += f" (set ${TOKEN_ENV})"
    if request_id:
        line += f" (request id {request_id})"
    return CommandFailed(line)


def _malformed(what: str, why: str) -> CommandFailed:
    return CommandFailed(f"the agent's answer to {what} was malformed: {why}")


def _writes_in_place(target: Path) -> bool:
    """True when ``target`` exists and is not a regular file (a FIFO, a device, a
    symlink such as /dev/stdout): written into as omicron's ``File::create`` does, since
    renaming over it would replace the special file with a regular one."""
    try:
        mode = os.lstat(target).st_mode
    except FileNotFoundError:
        return False
    return not stat.S_ISREG(mode)


#: Files being downloaded (temporary names), removed on any exit (``remove_partial``).
_PARTIAL: set[Path] = set()


@contextmanager
def partial_file(*parts: Path) -> Iterator[None]:
    """While the block runs, ``parts`` are temporary files ``remove_partial`` removes."""
    _PARTIAL.update(parts)
    try:
        yield
    finally:
        _PARTIAL.difference_update(parts)


def remove_partial() -> None:
    """Remove the temporary files of downloads that did not finish (the CLI's last
    step: a signal can land anywhere, even in a cleanup handler)."""
    for part in list(_PARTIAL):
        part.unlink(missing_ok=True)
        _PARTIAL.discard(part)


class AgentClient:
    """One agent; use as ``async with AgentClient(url) as agent``."""

    def __init__(self, url: str) -> None:
        token = os.environ.get(TOKEN_ENV)
        headers = {"authorization": f"Bearer {token}"} if token else None
        self.url = url
        self._host = httpx.URL(url).host
        self._http = httpx.AsyncClient(
            base_url=url, headers=headers, timeout=httpx.Timeout(TIMEOUT_S)
        )

    async def __aenter__(self) -> AgentClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._http.aclose()

    async def call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """One request; its response if 2xx, else ``CommandFailed``."""
        async with self.stream(method, path, **kw) as response:
            await response.aread()
        return response

    async def answer(self, method: str, path: str, shape: Any, **kw: Any) -> Any:
        """One request's JSON answer as builtins, checked against ``shape`` (a wire
        type): a body that is not that is ``CommandFailed`` saying so, never a crash."""
        response = await self.call(method, path, **kw)
        try:
            msgspec.json.decode(response.content, type=shape)
            return msgspec.json.decode(response.content)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise _malformed(f"{method} {path}", str(exc)) from None

    @asynccontextmanager
    async def stream(self, method: str, path: str, **kw: Any) -> AsyncIterator[httpx.Response]:
        """A 2xx response whose body is still to be read (``aiter_bytes``)."""
        what = f"{method} {path}"
        t0 = time.monotonic()
        answered: httpx.Response | None = None
        try:
            async with self._http.stream(method, path, **kw) as response:
                answered = response
                log.debug(
                    "agent_answered",
                    request=what,
                    status=response.status_code,
                    request_id=response.headers.get("x-request-id"),
                    elapsed_s=round(time.monotonic() - t0, 3),
                )
                if response.status_code >= 400:
                    await response.aread()
                    raise _failure(response, what)
                yield response
        except httpx.TransportError as exc:
            raise self._broken(what, answered, exc) from None

    def _broken(
        self, what: str, response: httpx.Response | None, exc: httpx.TransportError
    ) -> CommandFailed:
        reason = underlying_reason(exc, host=self._host)
        if response is None:  # no answer at all
            return CommandFailed(f"{what}: cannot reach the agent at {self.url}: {reason}")
        got = response.num_bytes_downloaded
        announced = response.headers.get("content-length")
        of = f" of {announced}" if announced and announced.isdigit() else ""
        if isinstance(exc, httpx.RemoteProtocolError):  # closed early, or not HTTP
            return _malformed(what, f"it ended after {got}{of} bytes")
        return CommandFailed(f"{what}: the transfer broke after {got}{of} bytes: {reason}")

    async def download(
        self, path: str, target: Path | None, progress: Callable[[int, int | None], None]
    ) -> int:
        """Stream ``path``'s body to ``target`` (``None``: stdout), never whole in memory.

        A new or regular file is written under a temporary name beside ``target`` and
        renamed once all of it arrived (as many bytes as the agent announced): an
        interrupted download leaves nothing behind. Anything else that exists (a FIFO, a
        device, a symlink) is written into. Returns the bytes written."""
        if target is None or await trio.to_thread.run_sync(_writes_in_place, target):
            return await self._download_to(path, target, progress)
        part = target.with_name(f".{target.name}.part-{os.getpid()}")
        with partial_file(part):
            try:
                written = await self._download_to(path, part, progress, shown=target)
                await trio.Path(part).replace(target)
            finally:
                with trio.CancelScope(shield=True):
                    await trio.Path(part).unlink(missing_ok=True)
        return written

    async def _download_to(
        self,
        path: str,
        part: Path | None,
        progress: Callable[[int, int | None], None],
        shown: Path | None = None,
    ) -> int:
        async with self.stream("GET", path) as response:
            announced = response.headers.get("content-length")
            total = int(announced) if announced and announced.isdigit() else None
            written = 0
            where = "stdout" if part is None else str(shown or part)
            try:
                if part is None:
                    out = trio.wrap_file(os.fdopen(os.dup(1), "wb"))
                else:
                    out = await trio.open_file(part, "wb")
                async with out:  # closing flushes: its error is caught too
                    async for chunk in response.aiter_bytes(_CHUNK):
                        await out.write(chunk)
                        written += len(chunk)
                        progress(written, total)
            except OSError as exc:
                if isinstance(exc, BrokenPipeError):
                    raise
                raise CommandFailed(f"cannot write {where}: {os_reason(exc)}") from None
            if total is not None and written != total:
                raise _malformed(f"GET {path}", f"it ended after {written} of {total} bytes")
            return written
