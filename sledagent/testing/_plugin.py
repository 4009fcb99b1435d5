"""pytest fixtures for trio projects that test against a sled agent.

Registered as a pytest plugin (entry point ``sledagent``); needs pytest-trio with
``trio_mode = true``. Fixtures:

- ``fake_host``: fresh ``FakeHost`` (zones, Propolis fleet, Nexus, bundle store).
- ``agent_config``: ``fast_config()``; override the fixture to change timings.
- ``fake_agent``: an ``AgentHarness`` running for the test, on ``fake_host``.
- ``two_sleds``: ``TwoSleds``, sleds ``a`` and ``b`` on fakes against one ``FakeNexus``
  (live migration between them; no journal: a restart takes nothing back).

And a real-time deadline for every test (``_deadline.py``): a test that hangs fails
with its name, on a ``MockClock`` too.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from .._config import AgentConfig
from ._deadline import pytest_addoption as pytest_addoption
from ._deadline import pytest_configure as pytest_configure
from ._deadline import pytest_runtest_call as pytest_runtest_call
from ._deadline import pytest_runtest_protocol as pytest_runtest_protocol
from ._harness import AgentHarness, FakeHost, fast_config, open_fake_agent
from ._two_sleds import TwoSleds, open_two_sleds


@pytest.fixture
def fake_host() -> FakeHost:
    return FakeHost()


@pytest.fixture
def agent_config() -> AgentConfig:
    return fast_config()


@pytest.fixture
async def fake_agent(agent_config: AgentConfig, fake_host: FakeHost) -> AsyncIterator[AgentHarness]:
    async with open_fake_agent(agent_config, fake_host) as harness:
        yield harness


@pytest.fixture
async def two_sleds(agent_config: AgentConfig) -> AsyncIterator[TwoSleds]:
    async with open_two_sleds(agent_config) as sleds:
        yield sleds
