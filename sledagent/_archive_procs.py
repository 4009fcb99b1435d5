"""ProcessArchiver: ``TarArchiver``'s bundles, written in worker processes.

Why not the worker thread the stack names (``TarArchiver.write``): the archive threads
share the agent's GIL with its trio thread. In a mass stop the trio thread is busy
answering reads and publishing, and each archive thread waits for the GIL between its
reads, compression calls and writes: measured at 200 VMMs x 10 MB, the archive threads got
6.0 s of CPU in an 18.5 s bundling window while the machine stayed a quarter idle, and
each wrote ~80 MB/s against ~465 MB/s alone (docs/performance.md, "Where a mass stop's
drain goes"). A process has a GIL of its own; the trio thread is left only the pipe.

How: up to ``workers`` processes (``sledagent._archive_worker``), started by ``warm_up``
or on first use and kept; each takes one job at a time over its stdin (a length-prefixed
pickle of the ``ArchiveJob``: a trusted child of ours, nothing else reads the pipe; a
large output shared by many bundles, such as ``ss -an``, is sent once: ``BlobMirror``) and
answers on stdout with the ``BundleInfo`` or the error. The child runs the very same
``TarArchiver`` code (temporary name, fsync, rename, copies), at a lower CPU priority
(nice +10, like the threads), so everything that code guarantees holds. What the process
adds is handled here: on cancellation the worker is killed and every file the bundle
could have written, temporary or final, is removed after it has exited (it may have
renamed a whole bundle a moment before: the caller has gone, so it must not appear); a
worker that dies is replaced and its bundle fails (``ArchiveWorkerDied``) with nothing
left behind.
"""

from __future__ import annotations

import contextlib
import pickle
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog
import trio

from ._archive import IN_PROGRESS, TarArchiver, TempFilesInProgress, bundle_path
from ._archive_worker import HEADER as _HEADER
from ._archive_worker import NICE, BlobMirror
from ._host import ArchiveJob, BundleInfo

_log = structlog.get_logger("sledagent.archive")


class ArchiveWorkerDied(Exception):
    """The worker process writing a bundle exited without an answer."""


class _Worker:
    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self._buffer = bytearray()
        self._blobs = BlobMirror()  # what this worker holds of the shared outputs

    async def call(self, job: ArchiveJob) -> Any:
        assert self.process.stdin is not None and self.process.stdout is not None
        payload = self._blobs.encode(job)
        await self.process.stdin.send_all(_HEADER.pack(len(payload)) + payload)
        head = await self._read(_HEADER.size)
        return pickle.loads(await self._read(_HEADER.unpack(head)[0]))

    async def ready(self) -> None:
        """Wait for the worker's greeting: its imports (~0.7 s here) are done."""
        if _HEADER.unpack(await self._read(_HEADER.size))[0] != 0:
            raise ArchiveWorkerDied(f"archive worker {self.process.pid} did not greet")

    async def _read(self, n: int) -> bytes:
        assert self.process.stdout is not None
        while len(self._buffer) < n:
            chunk = await self.process.stdout.receive_some(max(65536, n - len(self._buffer)))
            if not chunk:
                raise ArchiveWorkerDied(f"archive worker {self.process.pid} exited")
            self._buffer += chunk
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data

    async def kill(self) -> None:
        with trio.CancelScope(shield=True):
            with contextlib.suppress(OSError):
                self.process.kill()
            await self.process.wait()
            for pipe in (self.process.stdin, self.process.stdout):
                if pipe is not None:
                    await pipe.aclose()


class ProcessArchiver:
    """An ``Archiver`` like ``TarArchiver`` (same arguments, same files), off the GIL."""

    def __init__(
        self,
        debug_dirs: Sequence[Path],
        *,
        compression_level: int = 2,
        max_file_bytes: int = 64 << 20,
        workers: int = 2,
        in_progress: TempFilesInProgress = IN_PROGRESS,
    ) -> None:
        # Validates the arguments here, in the agent, and sweeps and names files for it.
        self._local = TarArchiver(
            debug_dirs,
            compression_level=compression_level,
            max_file_bytes=max_file_bytes,
            in_progress=in_progress,
        )
        if workers < 1:
            raise ValueError("workers must be >= 1")
        # "-c", not "-m": the package imports this module, and runpy warns when the
        # module it runs as __main__ was imported first. The lower priority comes first:
        # the worker's imports (the whole package, ~0.7 s of CPU) must not compete with
        # the agent either (a restart re-adopting 1000 VMMs shared the CPU with them).
        # SIGINT is ignored before the imports, not after them (in ``serve``): a Ctrl-C
        # at the terminal reaches the whole process group, and a worker still importing
        # printed a KeyboardInterrupt traceback (the agent decides when a worker ends).
        self._argv = [
            sys.executable, "-c", "import os, signal, sys\n"
            "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
            f"try: os.nice({NICE})\nexcept OSError: pass\n"
            "from sledagent._archive_worker import serve; serve(sys.argv[1:])",
            repr(([str(d) for d in self._local.debug_dirs], compression_level, max_file_bytes)),
        ]  # fmt: skip
        self._workers = workers
        self._idle: list[_Worker] = []
        self._slots = trio.Semaphore(workers)
        self._closed = False
        #: Worker processes started over the archiver's life (tests read it).
        self.started = 0
        self._ended = 0  # killed; started - ended are alive (busy, idle or starting)
        #: Woken when a worker becomes idle after starting, or one ends.
        self._changed = trio.lowlevel.ParkingLot()

    @property
    def debug_dirs(self) -> list[Path]:
        return self._local.debug_dirs

    async def write(self, job: ArchiveJob) -> BundleInfo:
        """Write ``job``'s bundle in a worker process; all or nothing, as ``TarArchiver``."""
        temps = self._local.temp_files(job)
        # The worker's own registry is in its process: the agent's is this one.
        self._local.in_progress.add(temps)
        try:
            return await self._write(job)
        finally:
            self._local.in_progress.discard(temps)

    @property
    def in_progress(self) -> TempFilesInProgress:
        return self._local.in_progress

    async def _write(self, job: ArchiveJob) -> BundleInfo:
        async with self._slots:
            worker = await self._take()
            try:
                kind, value = await worker.call(job)
            except BaseException:  # cancelled, or the worker died: nothing may remain
                with trio.CancelScope(shield=True):  # the caller may be cancelled
                    await self._kill(worker)
                    await trio.to_thread.run_sync(self._remove_all, job)
                raise
            if self._closed:
                await self._kill(worker)
            else:
                self._idle.append(worker)
                self._changed.unpark_all()
        if kind == "error":
            raise value
        assert isinstance(value, BundleInfo)
        return value

    async def warm_up(self) -> None:
        """Start every worker now and wait until each is ready (the daemon does this
        at start, in the background): a worker's first job otherwise waits for its
        interpreter and imports (~0.7 s here), which showed as a slower drain for the
        first bundles of a small mass stop."""
        while self.started - self._ended < self._workers and not self._closed:
            try:
                worker = await self._start()
            except (ArchiveWorkerDied, OSError) as exc:
                # Not fatal to the agent: each bundle tries again, and fails alone.
                _log.warning("archive_worker_start_failed", error=str(exc))
                return
            if self._closed:  # closed while it started
                await self._kill(worker)
                return
            self._idle.append(worker)
            self._changed.unpark_all()

    async def _take(self) -> _Worker:
        """An idle worker; a new one if fewer than ``workers`` are alive; else wait for
        one that is starting (``warm_up``'s) rather than start one more."""
        while True:
            if self._idle:
                return self._idle.pop()
            if self.started - self._ended < self._workers:
                return await self._start()
            await self._changed.park()

    async def sweep_partial(self) -> int:
        return await self._local.sweep_partial()

    async def aclose(self) -> None:
        """Stop the idle workers (a busy one is stopped when its bundle ends)."""
        self._closed = True
        idle, self._idle = self._idle, []
        for worker in idle:
            await self._kill(worker)

    async def _kill(self, worker: _Worker) -> None:
        self._ended += 1
        self._changed.unpark_all()  # room for another worker
        await worker.kill()

    async def _start(self) -> _Worker:
        self.started += 1  # before the first await: counted as alive at once
        try:
            process = await trio.lowlevel.open_process(
                self._argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE
            )
        except BaseException:
            self._ended += 1
            self._changed.unpark_all()
            raise
        worker = _Worker(process)
        try:
            await worker.ready()
        except BaseException:  # cancelled while it started, or it died
            await self._kill(worker)  # shielded
            raise
        return worker

    def _remove_all(self, job: ArchiveJob) -> None:
        zone, bundle = job.metadata.id.zone_name, job.metadata.id.bundle_id
        for debug_dir in self._local.debug_dirs:
            final = bundle_path(debug_dir, zone, bundle)
            for path in (final, self._local.tmp_for(final)):
                with contextlib.suppress(OSError):
                    path.unlink()
