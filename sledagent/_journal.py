"""A journal of terminal states not yet acknowledged by Nexus, replayed at start.

The agent publishes a halt before anything else, but a crash between the halt and
Nexus's acknowledgement would lose that VMM's terminal state: the agent keeps its VMMs
in memory, and after a restart the VMM is unknown here (the crash soak lost 3 of 400
this way). The notifier records each terminal state here and marks it delivered when
Nexus answers; at start, what was never marked is published again. Re-sending is
harmless: Nexus applies a state only if its generation is newer than what it has.

Appends are JSON lines, written and fsynced by one task in a worker thread, in batches:
``record`` and ``delivered`` never block and never fail (called from synchronous code).
The window a crash can still hit shrinks to the few milliseconds before the batch is on
disk. At start the file is read, the pending states returned, and the file rewritten
with only them (temporary file + rename); while running, the file is emptied whenever
every recorded state has been answered.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import msgspec
import structlog
import trio

from ._codec import encode
from ._wire import SledVmmState

log = structlog.get_logger("sledagent.journal")


class StateJournal:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._queue: list[bytes] = []
        self._wake = trio.Event()
        self._open: set[uuid.UUID] = set()  # recorded and not yet answered

    # --- from the notifier (synchronous, never blocking) -------------------------------

    def record(self, propolis_id: uuid.UUID, state: SledVmmState) -> None:
        line = {"op": "halt", "propolis_id": str(propolis_id), "state": json.loads(encode(state))}
        self._open.add(propolis_id)
        self._append(line)

    def delivered(self, propolis_id: uuid.UUID, gen: int) -> None:
        self._open.discard(propolis_id)
        self._append({"op": "done", "propolis_id": str(propolis_id), "gen": gen})

    def _append(self, line: dict[str, object]) -> None:
        self._queue.append(json.dumps(line, separators=(",", ":")).encode() + b"\n")
        self._wake.set()

    # --- the writer ------------------------------------------------------------------

    async def load(self) -> dict[uuid.UUID, SledVmmState]:
        """The terminal states never acknowledged; rewrites the file with only them."""
        pending = await trio.to_thread.run_sync(self._load)
        if pending:
            log.info("journal_replay", states=len(pending))
        return pending

    def _load(self) -> dict[uuid.UUID, SledVmmState]:
        pending: dict[uuid.UUID, SledVmmState] = {}
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            text = ""
        for n, raw in enumerate(text.splitlines(), 1):
            try:
                line = json.loads(raw)
                pid = uuid.UUID(line["propolis_id"])
                if line["op"] == "halt":
                    pending[pid] = msgspec.convert(line["state"], SledVmmState, strict=False)
                elif (
                    line["op"] == "done" and pid in pending and int(line["gen"]) >= pending[pid].gen
                ):
                    del pending[pid]
            except (ValueError, KeyError, TypeError, msgspec.ValidationError) as exc:
                # A torn last line (a crash mid-append) or damage: skip it, keep the rest.
                log.warning("journal_line_skipped", line=n, error=str(exc))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            for pid, state in pending.items():
                record = {"op": "halt", "propolis_id": str(pid), "state": json.loads(encode(state))}
                f.write(json.dumps(record, separators=(",", ":")).encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, self.path)
        return pending

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write what is queued, in batches, until cancelled (then a last shielded flush)."""
        task_status.started()
        try:
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                await self._flush()
        finally:
            with trio.move_on_after(5, shield=True):
                await self._flush()

    async def _flush(self) -> None:
        batch, self._queue = self._queue, []
        # Nothing left unanswered: the whole file is history, so it is emptied rather
        # than appended to (a long-running daemon's journal stays small).
        settled = not self._open
        if batch:
            try:
                await trio.to_thread.run_sync(self._write, b"".join(batch), settled)
            except OSError as exc:
                log.error("journal_write_failed", error=str(exc), lines=len(batch))

    def _write(self, data: bytes, settled: bool) -> None:
        with open(self.path, "wb" if settled else "ab") as f:
            if not settled:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
