"""Compose a sled agent from the fakes: what the fixtures (and the benchmark) use."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import trio

from .._agent import Host, SledAgent, open_sled_agent
from .._archive import TarArchiver
from .._bundle_store import DiskBundleStore
from .._config import AgentConfig, BackoffPolicy
from .._journal import StateJournal
from .._local_zones import LocalZoneBackend, LocalZonesConfig
from .._registry import VmmPhase
from .._store import MemoryBundleStore
from .._wire import SledVmmState, VmmState, VmmStateRequested, VmmStateRequestedType
from ._examples import ensure_body
from ._nexus import FakeNexus
from ._propolis import FakePropolisFleet
from ._zones import FakeZones


def fast_config(**overrides: object) -> AgentConfig:
    """A config with short retry timings, for tests and the fake-backend benchmark."""
    base: dict[str, object] = {
        "reaper_backoff": BackoffPolicy(initial_s=0.05, max_s=1.0),
        "nic_release_timeout_s": 5.0,
        "shutdown_drain_s": 5.0,
    }
    base.update(overrides)
    return AgentConfig(**base)  # type: ignore[arg-type]


@attrs.define
class FakeHost:
    """Fake zones, Propolis fleet, Nexus and store. They outlive an agent: open a second
    agent on the same ``FakeHost`` to restart it. With ``journal_path`` each agent gets a
    write-ahead journal there (SQLite), so a restart takes its VMMs back."""

    zones: FakeZones = attrs.field(factory=FakeZones)
    propolis: FakePropolisFleet = attrs.field(factory=FakePropolisFleet)
    nexus: FakeNexus = attrs.field(factory=FakeNexus)
    store: MemoryBundleStore = attrs.field(factory=MemoryBundleStore)
    journal_path: Path | None = None

    def __attrs_post_init__(self) -> None:
        self.zones.on_vmm_gone = self.propolis.zone_halted  # a zone's Propolis dies with it

    def host(self) -> Host:
        return Host(
            backend=self.zones,
            connector=self.propolis,
            nexus=self.nexus,
            archiver=self.zones.archiver(),
            store=self.store,
            journal=None if self.journal_path is None else StateJournal(self.journal_path),
        )


@attrs.define
class LocalHost:
    """Real local zones, real tar.gz bundles and store; fake Propolis and Nexus."""

    zones: LocalZoneBackend
    archiver: TarArchiver
    store: DiskBundleStore
    propolis: FakePropolisFleet = attrs.field(factory=FakePropolisFleet)
    nexus: FakeNexus = attrs.field(factory=FakeNexus)

    @classmethod
    def at(
        cls,
        root: Path,
        *,
        debug_dirs: int = 1,
        compression_level: int = 2,
        max_file_bytes: int = 64 << 20,
        quota_bytes: int | None = None,
        **zone_options: Any,
    ) -> LocalHost:
        """Everything under ``root``: ``zones/``, ``snapshots/``, ``debug<i>/``."""
        dirs = [root / f"debug{i}" for i in range(debug_dirs)]
        return cls(
            zones=LocalZoneBackend(LocalZonesConfig(root=root, **zone_options)),
            archiver=TarArchiver(
                dirs, compression_level=compression_level, max_file_bytes=max_file_bytes
            ),
            store=DiskBundleStore(
                dirs, context_path=root / "bundle-cleanup-context.toml", quota_bytes=quota_bytes
            ),
        )

    def host(self) -> Host:
        return Host(
            backend=self.zones,
            connector=self.propolis,
            nexus=self.nexus,
            archiver=self.archiver,
            store=self.store,
        )


@attrs.define
class AgentHarness:
    """An agent running on fakes, with helpers that act as Nexus would."""

    agent: SledAgent
    fakes: Any  # FakeHost or LocalHost

    async def start_vmm(
        self,
        *,
        instance_id: uuid.UUID | None = None,
        nic_ids: Iterable[uuid.UUID] = (),
        propolis_id: uuid.UUID | None = None,
    ) -> uuid.UUID:
        """Register a VMM and ask it to run; returns its propolis id once it is running."""
        propolis_id = propolis_id or uuid.uuid4()
        manager = self.agent.manager
        manager.register(propolis_id, ensure_body(instance_id, nic_ids=nic_ids))
        await manager.put_state(propolis_id, VmmStateRequested(VmmStateRequestedType.RUNNING))
        entry = manager.registry.get(propolis_id)
        # The monitor observes Propolis's Running shortly after the request returns.
        await entry.wait_until(
            lambda e: e.state.vmm_state.state is VmmState.RUNNING or e.phase is not VmmPhase.ACTIVE
        )
        if entry.phase is not VmmPhase.ACTIVE:
            raise RuntimeError(f"VMM {propolis_id} halted while starting: {entry.state}")
        return propolis_id

    async def request(
        self, propolis_id: uuid.UUID, kind: VmmStateRequestedType
    ) -> SledVmmState | None:
        response = await self.agent.manager.put_state(propolis_id, VmmStateRequested(kind))
        return response.updated_runtime


@asynccontextmanager
async def open_fake_agent(
    config: AgentConfig | None = None, fakes: FakeHost | LocalHost | None = None
) -> AsyncIterator[AgentHarness]:
    """Run a sled agent on fakes (or a ``LocalHost``) for the duration of the block."""
    host = fakes or FakeHost()
    async with trio.open_nursery() as nursery:
        await nursery.start(host.propolis.run)  # its VMs' migration tasks
        async with open_sled_agent(config or fast_config(), host.host()) as agent:
            yield AgentHarness(agent, host)
        nursery.cancel_scope.cancel()
