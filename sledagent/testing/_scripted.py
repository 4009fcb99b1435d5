"""Scripted answers in front of a peer's HTTP app: a hostile or buggy Propolis (or Nexus).

``ScriptedAnswers(app)`` is an ASGI app that passes every request to ``app`` except those
a test scripted with ``answer(method, path, status, body, times=...)``: those get that
status and body verbatim (any bytes: not JSON, a field missing, a 2 MB message).
``answered[(method, path)]`` counts the scripted answers given, and ``wait_answered``
waits for the n-th, so a test waits for the event rather than a duration.
"""

from __future__ import annotations

from collections import Counter

import attrs
import trio
from starlette.types import ASGIApp, Receive, Scope, Send


@attrs.define
class _Script:
    status: int
    body: bytes
    times: int | None  # None: every time


class ScriptedAnswers:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._scripts: dict[tuple[str, str], _Script] = {}
        self.answered: Counter[tuple[str, str]] = Counter()
        self._changed = trio.Event()

    def answer(
        self, method: str, path: str, status: int, body: bytes, *, times: int | None = None
    ) -> None:
        """Answer ``method path`` with ``status`` and ``body``: ``times`` times, or always."""
        self._scripts[(method, path)] = _Script(status, body, times)

    def stop(self, method: str, path: str) -> None:
        """Pass ``method path`` to the app again."""
        self._scripts.pop((method, path), None)

    async def wait_answered(self, method: str, path: str, n: int = 1) -> None:
        """Until ``n`` scripted answers to ``method path`` have been given."""
        while self.answered[(method, path)] < n:
            await self._changed.wait()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = (scope.get("method", ""), scope.get("path", ""))
        script = self._scripts.get(key) if scope["type"] == "http" else None
        if script is None:
            await self.app(scope, receive, send)
            return
        if script.times is not None:
            script.times -= 1
            if script.times <= 0:
                del self._scripts[key]
        while (await receive()).get("more_body", False):
            pass
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": script.status, "headers": headers})
        await send({"type": "http.response.body", "body": script.body})
        self.answered[key] += 1
        self._changed.set()
        self._changed = trio.Event()
