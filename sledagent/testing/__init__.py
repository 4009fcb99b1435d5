"""Test doubles and fixtures for the sled agent: a product feature, not a test detail.

Everything is in process and deterministic under ``trio.testing.MockClock`` (durations
are ``trio.sleep``s; no threads). See docs/testing.md.
"""

from .._retry_after import RetryOverloaded as RetryOverloaded
from ._examples import ensure_body as ensure_body
from ._examples import ensure_body_json as ensure_body_json
from ._harness import AgentHarness as AgentHarness
from ._harness import FakeHost as FakeHost
from ._harness import LocalHost as LocalHost
from ._harness import fast_config as fast_config
from ._harness import open_fake_agent as open_fake_agent
from ._ledger import MigrationLedger as MigrationLedger
from ._ledger import MigrationRecord as MigrationRecord
from ._migrate import LocalNetwork as LocalNetwork
from ._nexus import FakeNexus as FakeNexus
from ._nexus import NexusUpdate as NexusUpdate
from ._propolis import FakePropolis as FakePropolis
from ._propolis import FakePropolisFleet as FakePropolisFleet
from ._scripted import ScriptedAnswers as ScriptedAnswers
from ._two_sleds import Migration as Migration
from ._two_sleds import Sled as Sled
from ._two_sleds import TwoSleds as TwoSleds
from ._two_sleds import open_two_sleds as open_two_sleds
from ._zones import FakeArchiver as FakeArchiver
from ._zones import FakeZones as FakeZones
from ._zones import InjectedFault as InjectedFault
from ._zones import ZoneTimeline as ZoneTimeline

__all__ = [
    "AgentHarness",
    "FakeArchiver",
    "FakeHost",
    "FakeNexus",
    "FakePropolis",
    "FakePropolisFleet",
    "FakeZones",
    "InjectedFault",
    "LocalHost",
    "LocalNetwork",
    "Migration",
    "MigrationLedger",
    "MigrationRecord",
    "NexusUpdate",
    "RetryOverloaded",
    "ScriptedAnswers",
    "Sled",
    "TwoSleds",
    "ZoneTimeline",
    "ensure_body",
    "ensure_body_json",
    "fast_config",
    "open_fake_agent",
    "open_two_sleds",
]
