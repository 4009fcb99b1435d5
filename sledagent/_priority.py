"""Background CPU priority for worker threads that bundle.

The agent's trio thread answers every request and publishes every halt; bundling
(compression in worker threads, zone commands) is background work that may take as long
as it needs. On a busy host both want the same cores, and the kernel shares them fairly,
so a request waits behind compression time slices (measured: GET state p50 69 ms at 50
VMMs bundling on 2 cores). Lowering the worker thread's priority for the duration of the
bundle lets the trio thread run first; bundling still uses every idle cycle.

On Linux, ``setpriority(PRIO_PROCESS, tid)`` sets one thread's nice value. Elsewhere, or
when not permitted, this does nothing. Raising a nice value back needs privilege, so the
thread's old value is restored only where the kernel allows it; a pooled worker thread
left at a lower priority only runs other background work a little later.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

#: How much nicer than the agent bundling runs (0..19).
BACKGROUND_NICE = 10


@contextlib.contextmanager
def background_priority(nice: int = BACKGROUND_NICE) -> Iterator[None]:
    """Run the calling thread at ``nice`` more than the process for the block."""
    tid = threading.get_native_id()
    try:
        before = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, before + nice))
    except (OSError, AttributeError):
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, tid, before)
