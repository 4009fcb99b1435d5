"""Every public entry point refuses bad arguments with a clear error type."""

from __future__ import annotations

import uuid

import pytest

from sledagent import AgentConfig, BackoffPolicy, BadRequest, VmmState
from sledagent.bench._mass_stop import MassStopParams
from sledagent.testing import AgentHarness, FakeZones, ensure_body


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_zones": 0}, "max_zones"),
        ({"runner_queue_size": 0}, "runner_queue_size"),
        ({"stop_grace_s": 0}, "stop_grace_s"),
        ({"nic_release_timeout_s": -1}, "nic_release_timeout_s"),
        ({"bundle_collect_concurrency": 0}, "bundle_collect_concurrency"),
        ({"bundle_archive_concurrency": 0}, "bundle_archive_concurrency"),
        ({"command_timeout_s": 0}, "command_timeout_s"),
        ({"compression_level": 10}, "compression_level"),
        ({"termination_policy": "sometimes"}, "sometimes"),
    ],
)
def test_a_bad_config_value_is_refused_naming_the_field(
    kwargs: dict[str, object], field: str
) -> None:
    with pytest.raises(ValueError, match=field):
        AgentConfig(**kwargs)  # type: ignore[arg-type]


def test_a_backoff_whose_cap_is_below_its_start_is_refused() -> None:
    with pytest.raises(ValueError, match="max_s"):
        BackoffPolicy(initial_s=5.0, max_s=1.0)
    delays = BackoffPolicy(initial_s=0.25, max_s=1.0).delays()
    assert [next(delays) for _ in range(5)] == [0.25, 0.5, 1.0, 1.0, 1.0]


async def test_manager_refuses_arguments_of_the_wrong_type(fake_agent: AgentHarness) -> None:
    manager = fake_agent.agent.manager
    with pytest.raises(BadRequest, match="propolis_id"):
        manager.register("not-a-uuid", ensure_body())  # type: ignore[arg-type]
    with pytest.raises(BadRequest, match="body"):
        manager.register(uuid.uuid4(), {"instance_id": "x"})  # type: ignore[arg-type]
    with pytest.raises(BadRequest, match="requested"):
        await manager.put_state(uuid.uuid4(), "running")  # type: ignore[arg-type]
    with pytest.raises(BadRequest, match="propolis_id"):
        await manager.get_state(str(uuid.uuid4()))  # type: ignore[arg-type]
    assert len(manager.registry) == 0


def test_fakes_and_benchmark_parameters_are_checked() -> None:
    with pytest.raises(ValueError, match="copy_s"):
        FakeZones(copy_s=-1)
    with pytest.raises(ValueError, match="vmms"):
        MassStopParams(vmms=0)
    with pytest.raises(ValueError, match="command-s"):
        MassStopParams(command_s=-0.1)


async def test_a_failing_fake_nexus_loses_no_state(fake_agent: AgentHarness) -> None:
    fakes = fake_agent.fakes
    fakes.nexus.refuse(1, status=500)  # a 5xx: retried, not lost
    pid = await fake_agent.start_vmm()
    fakes.propolis[pid].halt()
    await fakes.nexus.wait_for(pid, VmmState.DESTROYED)
    assert fakes.nexus.attempts > len(fakes.nexus.updates)
