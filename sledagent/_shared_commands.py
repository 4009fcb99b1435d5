"""Host-wide diagnostics, run once for all the zones bundled at about the same time.

On illumos each zone has its own process table and network stack, so ``netstat`` in a zone
says something about that zone. The local backend's zones share the host's: ``uptime``,
``who``, ``last`` and ``ss -an`` print the same thing in every zone's bundle. In a mass
stop of 200 zones they ran 200 times each within a few seconds: about 25 ms of CPU per
zone in process spawns (and ``ss`` prints every socket on the host, so N zones cost
O(N^2)), taken from the archiving that the drain waits for (docs/performance.md).

``SharedCommands`` runs such a command once per ``ttl_s``: callers arriving while it runs
wait for that run; callers within ``ttl_s`` of its end get its output. Every bundle still
carries the full output, taken at most ``ttl_s`` before its phase 1 began. A run that fails
or is cancelled is not shared: the callers that waited for it run their own.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import attrs
import trio

from ._host import CommandOutput


@attrs.define
class _Run:
    done: trio.Event = attrs.field(factory=trio.Event)
    result: CommandOutput | None = None
    finished_at: float = 0.0


class SharedCommands:
    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._runs: dict[tuple[str, ...], _Run] = {}
        #: How many times a command actually ran, and how many callers shared a run.
        self.runs = 0
        self.shared = 0

    async def run(
        self, argv: tuple[str, ...], execute: Callable[[], Awaitable[CommandOutput]]
    ) -> CommandOutput:
        current = self._runs.get(argv)
        if current is not None:
            if not current.done.is_set():
                await current.done.wait()
            fresh = trio.current_time() - current.finished_at <= self.ttl_s
            if current.result is not None and fresh:
                self.shared += 1
                return current.result
        mine = self._runs[argv] = _Run()
        self.runs += 1
        try:
            mine.result = await execute()
            return mine.result
        finally:
            mine.finished_at = trio.current_time()
            mine.done.set()
            if mine.result is None and self._runs.get(argv) is mine:
                del self._runs[argv]
