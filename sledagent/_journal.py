"""A write-ahead journal of every VMM's latest state, so that a crash loses no VMM.

The agent keeps its VMMs in memory. After a crash (kill -9, power) the next start knows
none of them: their zones are found on the host, bundled as unexpected and torn down,
and Nexus, which last heard "running" or "stopping", would never hear that they are
gone (the crash soak lost 3 of 400 terminal states so, and 7 of 8 VMMs at one point
killed 12 ms after a mass halt). So every state the agent tells anyone is recorded
here first:

- ``record`` at registration (the state the API answers) and for every state the
  notifier publishes; the notifier sends a state only once its line is on disk
  (``durable``), and the API answers a registration only then, so the journal's
  generation for a VMM is never older than one Nexus has seen;
- ``delivered`` when Nexus answered a terminal state: the VMM is closed.

At start (``load``), for each VMM not closed: a terminal state is published again (a
repeat is harmless: Nexus applies only newer generations); a VMM that was live is
published ``failed`` one generation past its last, because its zone does not survive
the startup sweep.

Lines are JSON, appended and fsynced by one task in a worker thread, in batches: many
VMMs halting at once share one fsync. ``record`` and ``delivered`` never block. The
file is rewritten with only the open VMMs (temporary file + rename) at start, and
whenever it has grown well past them, so it stays small.
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
from ._vmm_state import transition
from ._wire import SledVmmState, VmmState, utcnow

log = structlog.get_logger("sledagent.journal")

#: Rewrite the file once it holds this many lines beyond twice the open VMMs.
COMPACT_SLACK_LINES = 1000


def _line(op: str, propolis_id: uuid.UUID, **fields: object) -> bytes:
    record = {"op": op, "propolis_id": str(propolis_id), **fields}
    return json.dumps(record, separators=(",", ":")).encode() + b"\n"


def _state_line(propolis_id: uuid.UUID, state: SledVmmState) -> bytes:
    return _line("state", propolis_id, state=json.loads(encode(state)))


class StateJournal:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._queue: list[bytes] = []
        self._wake = trio.Event()
        #: Open VMMs (registered, terminal state not yet answered): their latest state.
        self._latest: dict[uuid.UUID, SledVmmState] = {}
        self._queued_seq = 0  # lines handed to ``record``/``delivered``
        self._durable_seq = 0  # lines on disk (or given up on: a broken disk)
        self._flushed = trio.Event()
        self._lines_in_file = 0

    # --- from the agent (synchronous, never blocking) ----------------------------------

    def record(self, propolis_id: uuid.UUID, state: SledVmmState) -> int:
        """Record a VMM's state; returns the sequence number ``durable`` waits for."""
        known = self._latest.get(propolis_id)
        if known is None or state.gen >= known.gen:
            self._latest[propolis_id] = state
        return self._append(_state_line(propolis_id, state))

    def delivered(self, propolis_id: uuid.UUID, gen: int) -> None:
        """Nexus answered this VMM's terminal state: it is closed."""
        known = self._latest.get(propolis_id)
        if known is not None and gen >= known.gen:
            del self._latest[propolis_id]
        self._append(_line("done", propolis_id, gen=gen))

    def _append(self, line: bytes) -> int:
        self._queue.append(line)
        self._queued_seq += 1
        self._wake.set()
        return self._queued_seq

    async def durable(self, seq: int) -> None:
        """Return once line ``seq`` is on disk (at once if the writer gave up on it)."""
        while self._durable_seq < seq:
            await self._flushed.wait()

    # --- start ---------------------------------------------------------------------

    async def load(self) -> dict[uuid.UUID, SledVmmState]:
        """What to publish after a crash, per VMM; rewrites the file with only those."""
        replay = await trio.to_thread.run_sync(self._load)
        if replay:
            lost = sum(1 for s in replay.values() if s.vmm_state.state is VmmState.FAILED)
            log.info("journal_replay", states=len(replay), live_vmms_failed=lost)
        return replay

    def _load(self) -> dict[uuid.UUID, SledVmmState]:
        latest: dict[uuid.UUID, SledVmmState] = {}
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            text = ""
        for n, raw in enumerate(text.splitlines(), 1):
            try:
                line = json.loads(raw)
                pid = uuid.UUID(line["propolis_id"])
                if line["op"] in ("state", "halt"):  # "halt": journals of 0.1
                    state = msgspec.convert(line["state"], SledVmmState, strict=False)
                    if pid not in latest or state.gen >= latest[pid].gen:
                        latest[pid] = state
                elif line["op"] == "done" and pid in latest and int(line["gen"]) >= latest[pid].gen:
                    del latest[pid]
            except (ValueError, KeyError, TypeError, msgspec.ValidationError) as exc:
                # A torn last line (a crash mid-append) or damage: skip it, keep the rest.
                log.warning("journal_line_skipped", line=n, error=str(exc))
        replay = {}
        for pid, state in latest.items():
            if state.vmm_state.state.is_halted:
                replay[pid] = state
            else:  # live when the agent died; its zone is swept: it is gone
                replay[pid] = transition(state, VmmState.FAILED, utcnow())
        self._latest = dict(replay)
        self._rewrite(b"".join(_state_line(pid, s) for pid, s in replay.items()))
        self._lines_in_file = len(replay)
        return replay

    # --- the writer ------------------------------------------------------------------

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
        upto = self._queued_seq
        if not batch:
            return
        compact = self._lines_in_file + len(batch) > 2 * len(self._latest) + COMPACT_SLACK_LINES
        try:
            if compact:  # the open VMMs' latest states replace the whole history
                data = b"".join(_state_line(pid, s) for pid, s in self._latest.items())
                await trio.to_thread.run_sync(self._rewrite, data)
                self._lines_in_file = len(self._latest)
            else:
                await trio.to_thread.run_sync(self._append_to_file, b"".join(batch))
                self._lines_in_file += len(batch)
        except OSError as exc:
            # Publishing must not stop on a broken disk; a crash now could lose states.
            log.error("journal_write_failed", error=str(exc), lines=len(batch))
        except BaseException:
            # Cancelled before the thread ran (shutdown): the last, shielded flush
            # writes these lines; dropping them would lose the newest answers.
            self._queue[:0] = batch
            raise
        self._durable_seq = upto
        self._flushed.set()
        self._flushed = trio.Event()

    def _append_to_file(self, data: bytes) -> None:
        with open(self.path, "ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def _rewrite(self, data: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, self.path)
