"""The archive worker process's loop (``serve``): see ``ProcessArchiver``. Kept apart
from ``_archive_procs``, which the agent imports, so that a worker imports little of
its own."""

from __future__ import annotations

import ast
import os
import pickle
import signal
import struct
import sys
import threading
from pathlib import Path
from typing import Any

#: Each message on the pipes: its length (4 bytes, big-endian), then a pickle.
HEADER = struct.Struct(">I")
#: The worker's CPU priority (nice), set before it imports anything (``ProcessArchiver``):
#: requests and publications (in the agent) go first.
NICE = 10


def _read_exactly(stream: Any, n: int) -> bytes | None:
    data = stream.read(n)
    return data if len(data) == n else None


def serve(argv: list[str]) -> None:
    """Answer jobs on stdin until it closes: ``(debug_dirs, level, max_file_bytes)`` in
    ``argv[0]``; an empty frame once ready, then per job ``("ok", BundleInfo)`` or
    ``("error", exception)``."""
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
    while (head := _read_exactly(stdin, HEADER.size)) is not None:
        payload = _read_exactly(stdin, HEADER.unpack(head)[0])
        if payload is None:
            return
        job = pickle.loads(payload)
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
