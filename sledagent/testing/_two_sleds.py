"""Two sled agents on fakes, against one Nexus: live migration without a host.

``open_two_sleds`` runs sleds ``a`` and ``b`` (two ``SledAgent``s, two sled ids, each on
its own ``FakeHost``) reporting to one ``FakeNexus``, their fake Propolis servers on one
``LocalNetwork``, so a target Propolis on one sled pulls its VM from a source on the
other through the migration phases, as Propolis does (``_migrate``). ``TwoSleds`` acts
as Nexus would: ``start_vmm`` registers and runs a VMM on a sled, ``migrate`` registers
the target with a ``migration_id`` and sends it ``migration_target``. The Nexus's ledger
(``nexus.ledger``) checks both sides' reports. Each sled can be restarted
(``restart``: the agent stops, or is killed, and a new one takes its VMMs back from the
journal, when ``journal_dir`` is given). Deterministic under ``autojump_clock`` when no
journal is used (the journal writes SQLite in a worker thread).
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import trio

from .._agent import SledAgent, open_sled_agent
from .._config import AgentConfig
from .._registry import VmmPhase
from .._wire import (
    InstanceMigrationTargetParams,
    SledVmmState,
    VmmState,
    VmmStateRequested,
    VmmStateRequestedType,
)
from ._examples import ensure_body
from ._harness import FakeHost, fast_config
from ._ledger import MigrationRecord, migration_ended
from ._migrate import LocalNetwork
from ._nexus import FakeNexus
from ._propolis import FakePropolis, FakePropolisFleet

_ids = itertools.count(1)


@attrs.define(eq=False)
class Sled:
    """One sled of the pair: its fakes (they outlive its agents) and its current agent."""

    name: str
    sled_id: uuid.UUID
    fakes: FakeHost
    agent: SledAgent | None = None
    _stop: trio.Event = attrs.Factory(trio.Event)
    _scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    _done: trio.Event = attrs.Factory(trio.Event)

    @property
    def running(self) -> SledAgent:
        if self.agent is None:
            raise RuntimeError(f"sled {self.name} has no agent running")
        return self.agent


@attrs.frozen
class Migration:
    """A migration ``TwoSleds.migrate`` started: the instance's VMM on each side."""

    migration_id: uuid.UUID
    instance_id: uuid.UUID
    source: uuid.UUID
    target: uuid.UUID
    source_sled: str
    target_sled: str


class TwoSleds:
    """Sleds ``a`` and ``b`` and their shared Nexus; acts as Nexus would."""

    def __init__(self, config: AgentConfig, nexus: FakeNexus, sleds: dict[str, Sled]) -> None:
        self.config = config
        self.nexus = nexus
        self.sleds = sleds
        self._nursery: trio.Nursery | None = None
        self._instances: dict[uuid.UUID, uuid.UUID] = {}  # propolis id -> instance id
        self._addrs: dict[uuid.UUID, str] = {}

    @property
    def a(self) -> Sled:
        return self.sleds["a"]

    @property
    def b(self) -> Sled:
        return self.sleds["b"]

    def propolis(self, propolis_id: uuid.UUID) -> FakePropolis:
        """The fake Propolis of a VMM, on whichever sled it runs."""
        for sled in self.sleds.values():
            vm = sled.fakes.propolis.by_id.get(propolis_id)
            if vm is not None:
                return vm
        raise KeyError(propolis_id)

    def state(self, sled: str, propolis_id: uuid.UUID) -> SledVmmState:
        """The VMM's state as its sled's agent answers it (``NoSuchVmm`` once gone)."""
        return self.sleds[sled].running.manager.registry.get(propolis_id).state

    async def start_vmm(
        self, sled: str = "a", *, propolis_id: uuid.UUID | None = None
    ) -> uuid.UUID:
        """Register a VMM on ``sled`` and run it; returns its propolis id once running."""
        pid = propolis_id or uuid.uuid4()
        instance_id = uuid.uuid4()
        manager = self.sleds[sled].running.manager
        manager.register(pid, ensure_body(instance_id, propolis_addr=self._addr(sled, pid)))
        await manager.put_state(pid, VmmStateRequested(VmmStateRequestedType.RUNNING))
        entry = manager.registry.get(pid)
        await entry.wait_until(
            lambda e: e.state.vmm_state.state is VmmState.RUNNING or e.phase is not VmmPhase.ACTIVE
        )
        if entry.phase is not VmmPhase.ACTIVE:
            raise RuntimeError(f"VMM {pid} halted while starting: {entry.state}")
        self._instances[pid] = instance_id
        return pid

    async def migrate(
        self, source: uuid.UUID, *, to: str | None = None, target: uuid.UUID | None = None
    ) -> Migration:
        """Start migrating ``source``'s instance to sled ``to`` (by default the other
        sled), as Nexus's ``instance_migrate`` saga does: register the target VMM with a
        new migration id, then ask it to migrate in from the source's Propolis. Returns
        once the target sled answered (the migration goes on; ``wait``)."""
        from_sled = self._sled_of(source)
        to = to or ("b" if from_sled == "a" else "a")
        target = target or uuid.uuid4()
        mid = uuid.uuid4()
        instance_id = self._instances[source]
        manager = self.sleds[to].running.manager
        body = ensure_body(instance_id, propolis_addr=self._addr(to, target), migration_id=mid)
        manager.register(target, body)
        self._instances[target] = instance_id
        params = InstanceMigrationTargetParams(src_propolis_addr=self._addrs[source])
        await manager.put_state(
            target, VmmStateRequested(VmmStateRequestedType.MIGRATION_TARGET, params)
        )
        return Migration(mid, instance_id, source, target, from_sled, to)

    async def wait(self, migration: Migration, *, both_sides: bool = True) -> MigrationRecord:
        """Wait until Nexus has the migration's end (``both_sides``: and the source's
        end too, when the source took part)."""

        return await self.nexus.wait_migration(
            migration.migration_id, lambda r: migration_ended(r, both_sides)
        )

    async def restart(self, sled: str, *, kill: bool = False) -> SledAgent:
        """Stop ``sled``'s agent (``kill``: cancelled at once, as kill -9; else it drains
        as on SIGTERM) and start a new one on the same fakes; returns the new agent."""
        s = self.sleds[sled]
        if kill:
            s._scope.cancel()
        else:
            s._stop.set()
        await s._done.wait()
        s._stop, s._scope, s._done = trio.Event(), trio.CancelScope(), trio.Event()
        assert self._nursery is not None
        await self._nursery.start(self._run, s)
        return s.running

    async def drain(self) -> None:
        """Wait until both sleds have reaped every defunct zone and published everything."""
        for sled in self.sleds.values():
            await sled.running.drain()

    # --- internals ------------------------------------------------------------------------

    def _sled_of(self, propolis_id: uuid.UUID) -> str:
        for name, sled in self.sleds.items():
            if sled.agent is not None and sled.agent.manager.registry.find(propolis_id):
                return name
        raise KeyError(f"VMM {propolis_id} is on neither sled")

    def _addr(self, sled: str, propolis_id: uuid.UUID) -> str:
        # Nexus gives each Propolis zone its own address (omicron: the zone's IP).
        addr = f"[fd00:{sled}::{next(_ids):x}]:12400"
        self._addrs[propolis_id] = addr
        return addr

    async def _run(self, sled: Sled, *, task_status: trio.TaskStatus[None]) -> None:
        try:
            with sled._scope:
                async with open_sled_agent(
                    self.config, sled.fakes.host(), sled_id=sled.sled_id
                ) as agent:
                    sled.agent = agent
                    task_status.started()
                    await sled._stop.wait()
        finally:
            sled.agent = None
            sled._done.set()


@asynccontextmanager
async def open_two_sleds(
    config: AgentConfig | None = None, *, journal_dir: Path | None = None
) -> AsyncIterator[TwoSleds]:
    """Run sleds ``a`` and ``b`` on fakes against one ``FakeNexus`` for the block.
    ``journal_dir``: each sled journals there (``a.sqlite3``, ``b.sqlite3``), so a
    ``restart`` takes its VMMs back."""
    nexus, network = FakeNexus(), LocalNetwork()
    sleds = {
        name: Sled(
            name,
            uuid.uuid4(),
            FakeHost(
                propolis=FakePropolisFleet(network=network),
                nexus=nexus,
                journal_path=None if journal_dir is None else journal_dir / f"{name}.sqlite3",
            ),
        )
        for name in ("a", "b")
    }
    pair = TwoSleds(config or fast_config(), nexus, sleds)
    async with trio.open_nursery() as nursery:
        pair._nursery = nursery
        for sled in sleds.values():
            await nursery.start(sled.fakes.propolis.run)
            await nursery.start(pair._run, sled)
        yield pair
        nursery.cancel_scope.cancel()
