"""The registry: one source of truth for each VMM's phase and state.

A read is answered from here at once; it never goes through a runner's queue (omicron
routes reads through the runner, so a runner busy tearing down blocks them). An entry
moves ``active -> halted -> published -> removed`` and leaves the registry only after
Nexus acknowledged its terminal state, so Nexus never sees a 404 for a VMM whose end it
has not been told about (that 404 makes Nexus mark the instance Failed).
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import trio

from ._codec import encode
from ._errors import NoSuchVmm
from ._wire import InstanceEnsureBody, SledVmmState


class VmmPhase(enum.StrEnum):
    ACTIVE = "active"  # a runner applies requests and follows Propolis
    HALTED = "halted"  # terminal state recorded; zone handed off; publishing
    PUBLISHED = "published"  # Nexus acknowledged the terminal state
    REMOVED = "removed"  # gone from the registry: reads answer NoSuchVmm


@attrs.define(eq=False)
class VmmEntry:
    """One registered VMM. Only its runner (and the manager) write to it."""

    propolis_id: uuid.UUID
    #: The registration; ``None`` only for a VMM taken over from a journal of an older
    #: version, which held states only (it is held until its end is published).
    body: InstanceEnsureBody | None
    _state: SledVmmState
    _phase: VmmPhase = VmmPhase.ACTIVE
    #: trio clock time at which the terminal state was recorded.
    halted_at: float | None = None
    #: The runner applying this VMM's requests (an ``InstanceRunner``).
    runner: Any = None
    _changed: trio.Event = attrs.field(factory=trio.Event, init=False)

    @property
    def instance_id(self) -> uuid.UUID | None:
        return None if self.body is None else self.body.instance_id

    @property
    def state(self) -> SledVmmState:
        return self._state

    @state.setter
    def state(self, value: SledVmmState) -> None:
        self._state = value
        self._notify()

    @property
    def phase(self) -> VmmPhase:
        return self._phase

    @phase.setter
    def phase(self, value: VmmPhase) -> None:
        self._phase = value
        self._notify()

    def _notify(self) -> None:
        # Only pay for a new Event when someone is waiting (the hot path has no waiter).
        if self._changed.statistics().tasks_waiting:
            self._changed.set()
            self._changed = trio.Event()

    async def wait_until(self, predicate: Callable[[VmmEntry], bool]) -> None:
        """Return once ``predicate(entry)`` holds (checked after each change)."""
        while not predicate(self):
            await self._changed.wait()


@attrs.define
class Registry:
    """The VMMs of this sled, and the answer a state read gets for each.

    ``answer`` is read off the agent's thread (the front thread, ``_front``): it is a
    plain dictionary lookup of bytes set here on the agent's thread, never a value being
    built. An answer is the VMM's newest *journaled* state (``set_answer``, called as
    each journal batch reaches the disk): a read never promises what a crash could take
    back. A VMM with no answer yet is the app's (which waits for its journal write)."""

    _entries: dict[uuid.UUID, VmmEntry] = attrs.field(factory=dict)
    #: The encoded ``SledVmmState`` a read of each VMM answers (JSON bytes).
    _answers: dict[uuid.UUID, bytes] = attrs.field(factory=dict)
    #: Told of every change of an answer (``_front_proc``: the front process's replica):
    #: ``observer(propolis_id, answer)``, ``b""`` for a VMM registered with none yet,
    #: None for one removed. Called in the step that makes the change.
    observer: Callable[[uuid.UUID, bytes | None], None] | None = None

    def replica(self) -> list[tuple[bytes, bytes]]:
        """Every VMM's id (16 bytes) and answer (``b""``: none yet), for an observer
        that starts now."""
        answers = self._answers
        return [(pid.bytes, answers.get(pid, b"")) for pid in self._entries]

    def answer(self, propolis_id: uuid.UUID) -> bytes | None:
        """The body a state read answers now, or None (unknown, or not yet journaled)."""
        return self._answers.get(propolis_id)

    def set_answer(self, propolis_id: uuid.UUID, state: SledVmmState) -> None:
        """``state`` is journaled: reads may answer it (a VMM no longer here: ignored,
        a journal batch landing after its removal must not bring it back)."""
        if propolis_id in self._entries:
            answer = self._answers[propolis_id] = encode(state)
            if self.observer is not None:
                self.observer(propolis_id, answer)

    def get(self, propolis_id: uuid.UUID) -> VmmEntry:
        try:
            return self._entries[propolis_id]
        except KeyError:
            raise NoSuchVmm(propolis_id) from None

    def find(self, propolis_id: uuid.UUID) -> VmmEntry | None:
        return self._entries.get(propolis_id)

    def add(self, entry: VmmEntry) -> None:
        assert entry.propolis_id not in self._entries
        self._entries[entry.propolis_id] = entry
        if self.observer is not None:
            self.observer(entry.propolis_id, b"")

    def remove(self, propolis_id: uuid.UUID) -> VmmEntry | None:
        entry = self._entries.pop(propolis_id, None)
        self._answers.pop(propolis_id, None)
        if entry is not None and self.observer is not None:
            self.observer(propolis_id, None)
        if entry is not None:
            entry.phase = VmmPhase.REMOVED
        return entry

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[VmmEntry]:
        return iter(list(self._entries.values()))

    def count(self, phase: VmmPhase) -> int:
        return sum(1 for e in self._entries.values() if e.phase is phase)
