"""ArchiveSlots: phase 2's admission, a slot count driven by the bytes being archived.

Why not a fixed ``CapacityLimiter(cores)``: a small bundle's archive is mostly fixed
cost that is not CPU (the round trip to a worker process, two fsyncs, waiting for a CPU
at nice +10 beside the agent), so two slots left the CPU half idle in a mass stop of
small zones: 1000 zones x 1 MB drained in 16-20 s with the two slots ~83% busy at ~30 ms
a bundle, for ~7 ms of compression each (docs/performance.md, "Session 10"). A large
bundle is CPU-bound, and more of them at once would only take CPU from the agent.

So: ``slots`` bundles of any size may be archived at once (the number of cores), and
up to ``max_slots`` while the bytes being archived, this one's included, stay within
``small_bytes``. Admission is first come, first served: a large bundle waiting at the
head is not overtaken by small ones behind it.
"""

from __future__ import annotations

import collections
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import trio


@attrs.define(eq=False)
class _Waiter:
    nbytes: int
    granted: trio.Event = attrs.field(factory=trio.Event)


class ArchiveSlots:
    """``hold(nbytes)``: wait for a phase-2 slot for a bundle of ``nbytes`` input bytes
    (its logs and command outputs). Raises ``ValueError`` on bounds that admit nothing."""

    def __init__(self, slots: int, *, max_slots: int | None = None, small_bytes: int = 0) -> None:
        max_slots = slots if max_slots is None else max_slots
        if slots < 1 or max_slots < slots or small_bytes < 0:
            raise ValueError(
                f"archive slots: need 1 <= slots <= max_slots and small_bytes >= 0, "
                f"got slots={slots}, max_slots={max_slots}, small_bytes={small_bytes}"
            )
        self.slots = slots
        self.max_slots = max_slots
        self.small_bytes = small_bytes
        self.running = 0
        self.bytes_in_flight = 0
        self._queue: collections.deque[_Waiter] = collections.deque()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def _fits(self, nbytes: int) -> bool:
        if self.running < self.slots:
            return True
        return self.running < self.max_slots and self.bytes_in_flight + nbytes <= self.small_bytes

    def _take(self, nbytes: int) -> None:
        self.running += 1
        self.bytes_in_flight += nbytes

    def _wake(self) -> None:
        while self._queue and self._fits(self._queue[0].nbytes):
            waiter = self._queue.popleft()
            self._take(waiter.nbytes)
            waiter.granted.set()

    def _release(self, nbytes: int) -> None:
        self.running -= 1
        self.bytes_in_flight -= nbytes
        self._wake()

    async def _acquire(self, nbytes: int) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        if not self._queue and self._fits(nbytes):
            self._take(nbytes)
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        waiter = _Waiter(nbytes)
        self._queue.append(waiter)
        try:
            await waiter.granted.wait()
        except BaseException:
            if waiter.granted.is_set():  # granted, then cancelled before it ran
                self._release(nbytes)
            else:
                self._queue.remove(waiter)
                self._wake()  # it may have been the head that held the others back
            raise

    @asynccontextmanager
    async def hold(self, nbytes: int) -> AsyncIterator[None]:
        await self._acquire(nbytes)
        try:
            yield
        finally:
            self._release(nbytes)
