"""The archive worker process's loop (``serve``): see ``ProcessArchiver``. Kept apart
from ``_archive_procs``, which the agent imports, so that a worker imports little of
its own."""

from __future__ import annotations

import ast
import io
import os
import pickle
import signal
import struct
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: Each message on the pipes: its length (4 bytes, big-endian), then a pickle.
HEADER = struct.Struct(">I")
#: The worker's CPU priority (nice), set before it imports anything (``ProcessArchiver``):
#: requests and publications (in the agent) go first.
NICE = 10


#: A ``bytes`` in a job at least this long (a host-wide command's output: ``ss -an`` at
#: 1000 zones is ~650 KB, the same in every zone bundled within a second) is sent to a
#: worker once and then named by a key (``pickle`` persistent ids). Sent whole each time,
#: it took ~10 of each 1 MB bundle's ~30 ms at N=1000: the agent's thread fed the pipe
#: 64 KiB at a time (docs/performance.md, "Session 10").
SHARED_MIN_BYTES = 16 << 10


class _JobPickler(pickle.Pickler):
    """Pickles a job, naming each large ``bytes`` by its key in the worker's cache."""

    def __init__(self, out: io.BytesIO, keys: Callable[[bytes], int]) -> None:
        super().__init__(out, protocol=pickle.HIGHEST_PROTOCOL)
        self._keys = keys

    def persistent_id(self, obj: object) -> int | None:
        if type(obj) is bytes and len(obj) >= SHARED_MIN_BYTES:
            return self._keys(obj)
        return None


class _JobUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, blobs: dict[int, bytes]) -> None:
        super().__init__(io.BytesIO(data))
        self._blobs = blobs

    def persistent_load(self, pid: object) -> bytes:
        if not isinstance(pid, int) or pid not in self._blobs:
            raise pickle.UnpicklingError(f"no shared blob {pid!r} in this worker")
        return self._blobs[pid]


class BlobMirror:
    """The agent's copy of what one worker process holds: the large ``bytes`` of its
    last job, by key. ``encode`` frames a job, sending only the blobs the worker lacks;
    the worker (``_decode``) keeps exactly the blobs that job named, as this does."""

    def __init__(self) -> None:
        self._held: list[tuple[int, bytes]] = []
        self._next = 0

    def encode(self, job: object) -> bytes:
        used: list[tuple[int, bytes]] = []
        new: dict[int, bytes] = {}

        def key(blob: bytes) -> int:
            # The shared output is one object in every job: ``is`` finds it at once.
            known = [k for k, held in (*used, *self._held) if held is blob or held == blob]
            if known:
                k = known[0]
            else:
                k, self._next = self._next, self._next + 1
                new[k] = blob
            if all(k != u for u, _ in used):
                used.append((k, blob))
            return k

        out = io.BytesIO()
        _JobPickler(out, key).dump(job)
        # Mirrors the worker from now on: if this frame does not arrive whole, the
        # worker is killed (``_archive_procs``) and its mirror goes with it.
        self._held = used
        keep = [k for k, _ in used]
        return pickle.dumps((new, keep, out.getvalue()), protocol=pickle.HIGHEST_PROTOCOL)


def _decode(payload: bytes, blobs: dict[int, bytes]) -> tuple[object, dict[int, bytes]]:
    """A job framed by ``BlobMirror.encode``, and the blobs the worker keeps after it."""
    new, keep, data = pickle.loads(payload)
    blobs.update(new)
    blobs = {k: blobs[k] for k in keep}
    return _JobUnpickler(data, blobs).load(), blobs


def _read_exactly(stream: Any, n: int) -> bytes | None:
    data = stream.read(n)
    return data if len(data) == n else None


def serve(argv: list[str]) -> None:
    """Answer jobs on stdin until it closes: ``(debug_dirs, level, max_file_bytes)`` in
    ``argv[0]``; an empty frame once ready, then per job (framed by ``BlobMirror``)
    ``("ok", BundleInfo)`` or ``("error", exception)``."""
    from ._archive import TarArchiver

    dirs, level, max_file_bytes = ast.literal_eval(argv[0])
    archiver = TarArchiver(
        [Path(d) for d in dirs], compression_level=level, max_file_bytes=max_file_bytes
    )
    # The agent decides when a worker ends (stdin closed, or killed): a Ctrl-C at the
    # terminal reaches the whole process group, and the agent's shutdown needs it alive.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    never = threading.Event()  # cancellation comes as SIGKILL, from the agent
    # Answers go to the pipe on fd 1 alone: anything else printing (a log line, a
    # warning) goes to stderr instead of into the protocol.
    stdin, stdout = sys.stdin.buffer, os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        _serve_jobs(stdin, stdout, archiver, never)
    except BrokenPipeError:
        # The agent died (kill -9) while this worker ran a job: nobody reads the answer.
        # Exit quietly rather than print a traceback into the agent's shared stderr log.
        os._exit(0)


def _serve_jobs(stdin: Any, stdout: Any, archiver: Any, never: threading.Event) -> None:
    stdout.write(HEADER.pack(0))  # ready: imports done (an empty frame)
    stdout.flush()
    blobs: dict[int, bytes] = {}
    while (head := _read_exactly(stdin, HEADER.size)) is not None:
        payload = _read_exactly(stdin, HEADER.unpack(head)[0])
        if payload is None:
            return
        job, blobs = _decode(payload, blobs)
        try:
            answer: tuple[str, object] = ("ok", archiver.write_sync(job, never))
        except Exception as exc:
            answer = ("error", exc)
        try:
            data = pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # an exception that cannot be pickled: keep its words
            data = pickle.dumps(("error", RuntimeError(repr(exc))))
        stdout.write(HEADER.pack(len(data)) + data)
        stdout.flush()
