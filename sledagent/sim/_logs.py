"""Logs written by the simulated Propolis servers, into their zones.

A real Propolis writes bunyan JSON lines to its SMF service log inside its zone; SMF
rotates it, and omicron archives the old files to a debug dataset. The simulated fleet
does the same for every zone it serves: ``LogSpec`` says where and how fast, and one
``SimLogWriter`` per fleet appends to all of them.

One writer for the whole fleet rather than a task or a process per VM: with 1000
simulated VMMs in one process, a task per VM would wake 1000 times per tick and do file
I/O on the trio thread. Here one periodic task hands the whole tick's writes to one
worker thread (the files are small appends), so the trio thread only schedules.
"""

from __future__ import annotations

import random

import trio

from .._local_zones import LogSpec
from .._logwriter import SERVICE_LOG, log_lines, rotate, start_log


class SimLogWriter:
    """Appends each registered zone's log lines every ``interval_s``, in one thread."""

    def __init__(self, *, interval_s: float = 0.5, seed: int | None = None) -> None:
        self._interval = interval_s
        self._specs: dict[str, LogSpec] = {}
        self._rng = random.Random(seed)
        self.written_bytes = 0
        #: Ticks done (a tick's writes are on disk when it counts): a caller waits for
        #: a tick begun after a change (``remove``) to know the change holds on disk.
        self.ticks = 0
        self._idle = trio.Event()
        self._idle.set()

    async def start(self, zone_name: str, spec: LogSpec) -> None:
        """Create the zone's log now (``start_log``: a real service's log exists from
        its start), then append to it every tick until ``remove``. Raises ``OSError``
        if the log cannot be created."""
        await trio.to_thread.run_sync(start_log, spec.log_dir, zone_name)
        self.add(zone_name, spec)

    def add(self, zone_name: str, spec: LogSpec) -> None:
        self._specs[zone_name] = spec

    def remove(self, zone_name: str) -> None:
        self._specs.pop(zone_name, None)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            t0 = trio.current_time()
            if self._specs:
                batch = list(self._specs.values())
                self._idle = trio.Event()
                try:
                    self.written_bytes += await trio.to_thread.run_sync(self._write, batch)
                finally:
                    self._idle.set()
            self.ticks += 1
            await trio.sleep(max(0.0, self._interval - (trio.current_time() - t0)))

    async def settled(self) -> None:
        """Return once no write is under way: a zone ``remove``d before this call gets no
        more bytes after it (its directory can be removed without one coming back)."""
        await self._idle.wait()

    def _write(self, batch: list[LogSpec]) -> int:
        written = 0
        for spec in batch:
            try:
                spec.log_dir.mkdir(parents=True, exist_ok=True)
                path = spec.log_dir / SERVICE_LOG
                data = log_lines(max(1, int(spec.rate_bps * self._interval)), self._rng)
                with open(path, "ab") as f:
                    f.write(data)
                written += len(data)
                if path.stat().st_size >= spec.rotate_bytes:
                    rotate(spec.log_dir, spec.archive_dir, spec.keep)
            except OSError:
                # The zone is being torn down under us (its directory removed): the
                # fleet retires its Propolis next; nothing to write to any more.
                continue
        return written
