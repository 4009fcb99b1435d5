"""Propolis and Nexus semantics at the edges (the table "Propolis errors" in
docs/design.md): a Propolis that lost its VM, permanent refusals, a Propolis that answers
the long poll without waiting, and generations at the edge of u64."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import structlog
import trio
import trio.testing

from sledagent import VmmPhase, VmmState
from sledagent._errors import (
    GenerationExhausted,
    NoSuchVmm,
    PropolisRefused,
    Terminating,
    Unavailable,
)
from sledagent._host import Zone, zone_name_for
from sledagent._wire import InstanceState, VmmStateRequested, VmmStateRequestedType
from sledagent.testing import (
    FakeHost,
    ensure_body,
    ensure_body_json,
    fast_config,
    open_fake_agent,
)

from .conftest import Contract
from .test_api import STATE, VMM, open_api

REBOOT = VmmStateRequested(VmmStateRequestedType.REBOOT)
STOP = VmmStateRequested(VmmStateRequestedType.STOPPED)
RUN = VmmStateRequested(VmmStateRequestedType.RUNNING)


@pytest.mark.parametrize("request_kind", [REBOOT, STOP])
async def test_a_propolis_that_lost_a_running_vm_fails_the_vmm_and_answers_gone(
    request_kind: VmmStateRequested, autojump_clock: trio.abc.Clock
) -> None:
    """Propolis restarted under a running VMM (its long poll still open): the state
    change gets NoInstance. omicron #6726: the VMM fails at once, the caller hears 410."""
    fakes = FakeHost()
    async with open_fake_agent(fast_config(), fakes) as h:
        pid = await h.start_vmm()
        fakes.propolis[pid].refuse_requests(410, "NoInstance", message="no instance")
        with pytest.raises(Terminating) as caught:
            await h.agent.manager.put_state(pid, request_kind)
        assert (caught.value.status, caught.value.error_code) == (410, "NO_SUCH_INSTANCE")
        entry = h.agent.manager.registry.find(pid)
        assert entry is None or entry.phase is not VmmPhase.ACTIVE
        await fakes.nexus.wait_for(pid, VmmState.FAILED)  # at once, not after a grace
        await h.agent.drain()
    assert fakes.zones.zones == {}  # reaped


async def test_no_instance_before_the_vm_was_seen_live_is_retry_not_gone(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Propolis answers NoInstance while it still creates the VM: not a failure."""
    fakes = FakeHost()
    async with open_fake_agent(fast_config(), fakes) as h:
        pid = uuid.uuid4()
        h.agent.manager.register(pid, ensure_body())
        fakes.propolis.client_for(Zone(zone_name_for(pid), pid, "")).hang()
        await h.agent.manager.put_state(pid, RUN)  # the monitor has heard nothing yet
        assert not h.agent.manager.registry.get(pid).runner.seen_live
        fakes.propolis[pid].refuse_requests(424, "NoInstance", message="not initialized")
        with pytest.raises(Unavailable) as caught:
            await h.agent.manager.put_state(pid, REBOOT)
        assert caught.value.status == 503
        assert h.agent.manager.registry.get(pid).phase is VmmPhase.ACTIVE
        assert fakes.nexus.first_time(pid, VmmState.FAILED) is None


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        (400, None, (400, "PROPOLIS_REFUSED")),
        (403, None, (403, "PROPOLIS_REFUSED")),
        (409, "AlreadyRunning", (409, "PROPOLIS_REFUSED")),
        (404, "NO_SUCH_INSTANCE", (404, "PROPOLIS_REFUSED")),
        (500, None, (503, "SERVICE_UNAVAILABLE")),
        (503, None, (503, "SERVICE_UNAVAILABLE")),
        (429, None, (503, "SERVICE_UNAVAILABLE")),
    ],
)
async def test_a_permanent_refusal_stays_a_4xx_and_a_failing_propolis_is_a_503(
    status: int, code: str | None, expected: tuple[int, str], autojump_clock: trio.abc.Clock
) -> None:
    fakes = FakeHost()
    async with open_fake_agent(fast_config(), fakes) as h:
        pid = await h.start_vmm()
        fakes.propolis[pid].refuse_requests(
            status, code, message="instance state change not allowed"
        )
        with pytest.raises((PropolisRefused, Unavailable)) as caught:
            await h.agent.manager.put_state(pid, REBOOT)
        assert (caught.value.status, caught.value.error_code) == expected
        if status < 500 and status != 429:
            assert "instance state change not allowed" in caught.value.message
            assert code is None or code in caught.value.message  # quoted, never our code
        # The VMM is untouched and the next request is served.
        assert h.agent.manager.registry.get(pid).phase is VmmPhase.ACTIVE
        await h.agent.manager.put_state(pid, REBOOT)


async def test_a_propolis_that_answers_without_waiting_publishes_nothing_new(
    autojump_clock: trio.abc.Clock,
) -> None:
    """195 PUTs in 10 s for a VMM whose state never changed, before: now none, and the
    eager Propolis is polled with backoff (about 10 s / 1 s, not thousands)."""
    fakes = FakeHost()
    async with open_fake_agent(fast_config(), fakes) as h:
        pid = await h.start_vmm()
        await fakes.nexus.wait_for(pid, VmmState.RUNNING)
        await h.agent.notifier.wait_idle()
        before = len(fakes.nexus.states_for(pid))
        gen = h.agent.manager.registry.get(pid).state.gen
        vm = fakes.propolis[pid]
        answers = vm.monitor_answers
        vm.eager = True
        vm._wake()  # the open long poll answers at once, and so does every next one
        await trio.sleep(10.0)
        assert len(fakes.nexus.states_for(pid)) == before
        assert h.agent.manager.registry.get(pid).state.gen == gen
        assert vm.monitor_answers - answers <= 20
        # A real change still goes through at once.
        vm.halt()
        await fakes.nexus.wait_for(pid, VmmState.DESTROYED)
        assert fakes.nexus.latest(pid).gen == gen + 1  # type: ignore[union-attr]


@pytest.mark.parametrize("gen", [2**64, 10**30, -1])
async def test_a_generation_beyond_u64_is_refused_naming_the_field(
    gen: int, sled_agent_contract: Contract
) -> None:
    with trio.fail_after(30):
        async with await open_api(FakeHost(), sled_agent_contract) as api:
            pid = str(uuid.uuid4())
            r = await api.call(
                "PUT", VMM, 400, path={"propolis_id": pid}, json=ensure_body_json(gen=gen)
            )
            assert "`$.vmm_runtime.gen`" in r.json()["message"]  # the field, whatever bound
            await api.call("GET", STATE, 404, path={"propolis_id": pid})  # not registered


async def test_a_generation_at_the_u64_maximum_is_accepted_but_never_advanced(
    sled_agent_contract: Contract,
) -> None:
    fakes = FakeHost()
    with trio.fail_after(30):
        async with await open_api(fakes, sled_agent_contract) as api:
            pid = str(uuid.uuid4())
            r = await api.call(
                "PUT", VMM, 200, path={"propolis_id": pid}, json=ensure_body_json(gen=2**64 - 1)
            )
            assert r.json()["vmm_state"]["gen"] == 2**64 - 1
            r = await api.call(
                "PUT", STATE, 409, path={"propolis_id": pid}, json={"state": {"type": "running"}}
            )
            assert r.json()["error_code"] == "GENERATION_EXHAUSTED"
            assert fakes.nexus.states_for(uuid.UUID(pid)) == []  # never sent


async def test_a_vmm_at_the_u64_maximum_ends_without_sending_anything(
    autojump_clock: trio.abc.Clock,
) -> None:
    fakes = FakeHost()
    async with open_fake_agent(fast_config(), fakes) as h:
        pid = uuid.uuid4()
        h.agent.manager.register(pid, ensure_body(gen=2**64 - 1))
        with pytest.raises(GenerationExhausted):
            await h.agent.manager.put_state(pid, RUN)
        answer = await h.agent.manager.unregister(pid)
        assert answer.updated_runtime is not None
        assert answer.updated_runtime.gen == 2**64 - 1  # no generation left to end it with
        with pytest.raises(NoSuchVmm):  # it can never be told, so it is not kept
            await h.agent.manager.get_state(pid)
    assert fakes.nexus.states_for(pid) == []


def test_the_served_openapi_keeps_uint64_generations() -> None:
    from sledagent._openapi import openapi_document

    schemas: dict[str, Any] = openapi_document()["components"]["schemas"]
    assert schemas["VmmRuntimeState"]["properties"]["gen"]["format"] == "uint64"
    assert schemas["MigrationRuntimeState"]["properties"]["gen"]["format"] == "uint64"


async def test_over_http_a_lost_vm_is_410_and_nexus_hears_failed(
    sled_agent_contract: Contract,
) -> None:
    fakes = FakeHost()
    with trio.fail_after(30):
        async with await open_api(fakes, sled_agent_contract) as api:
            pid = str(uuid.uuid4())
            await api.call("PUT", VMM, 200, path={"propolis_id": pid}, json=ensure_body_json())
            body = {"state": {"type": "running"}}
            await api.call("PUT", STATE, 200, path={"propolis_id": pid}, json=body)
            await fakes.nexus.wait_for(uuid.UUID(pid), VmmState.RUNNING)
            fakes.propolis[uuid.UUID(pid)].refuse_requests(410, "NoInstance")
            fakes.nexus.latency_s = 0.5  # keep the failed-but-unacknowledged window visible
            r = await api.call(
                "PUT", STATE, 410, path={"propolis_id": pid}, json={"state": {"type": "reboot"}}
            )
            assert r.json()["error_code"] == "NO_SUCH_INSTANCE"
            r = await api.call("GET", STATE, 200, path={"propolis_id": pid})
            assert r.json()["vmm_state"]["state"] == "failed"
            await fakes.nexus.wait_for(uuid.UUID(pid), VmmState.FAILED)


async def test_a_vmm_at_the_u64_maximum_whose_guest_halts_is_ended_and_reaped(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Running at generation 2^64 - 1, its Propolis halts: no generation is left to
    publish it, but the VMM ends (abandoned, logged), its zone is bundled and reaped, and
    it leaves the registry; before, it reported ``running`` forever."""
    fakes = FakeHost()
    with structlog.testing.capture_logs() as logs:
        async with open_fake_agent(fast_config(), fakes) as h:
            pid = uuid.uuid4()
            h.agent.manager.register(pid, ensure_body(gen=2**64 - 2))
            await h.agent.manager.put_state(pid, RUN)
            await fakes.nexus.wait_for(pid, VmmState.RUNNING)
            assert h.agent.manager.registry.get(pid).state.gen == 2**64 - 1
            runner = h.agent.manager.registry.get(pid).runner
            assert runner is not None
            fakes.propolis[pid].halt()
            await runner.finished.wait()  # the halt is observed and the VMM ended
            await h.agent.drain()
            with pytest.raises(NoSuchVmm):
                await h.agent.manager.get_state(pid)
    assert fakes.zones.zones == {}  # reaped
    assert [u.state.vmm_state.state for u in fakes.nexus.updates] == [VmmState.RUNNING]
    assert [e for e in logs if e["event"] == "vmm_abandoned"]


async def test_a_propolis_that_advances_its_generation_on_every_answer_is_backed_off(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Answers at exactly the generation asked for, with nothing visible changed: 222
    polls in 5 s for 2 VMMs before. Now backed off after a few, logged once, and a real
    change still goes through."""
    fakes = FakeHost()
    with structlog.testing.capture_logs() as logs:
        async with open_fake_agent(fast_config(), fakes) as h:
            pid = await h.start_vmm()
            await fakes.nexus.wait_for(pid, VmmState.RUNNING)
            await h.agent.notifier.wait_idle()
            before = len(fakes.nexus.states_for(pid))
            gen = h.agent.manager.registry.get(pid).state.gen
            vm = fakes.propolis[pid]
            answers = vm.monitor_answers
            vm.restless = True
            vm._wake()
            await trio.sleep(10.0)
            assert vm.monitor_answers - answers <= 20
            assert len(fakes.nexus.states_for(pid)) == before
            vm.halt()
            await fakes.nexus.wait_for(pid, VmmState.DESTROYED)
            assert fakes.nexus.latest(pid).gen == gen + 1  # type: ignore[union-attr]
    assert len([e for e in logs if e["event"] == "propolis_answers_idle"]) == 1


async def test_an_invisible_propolis_step_is_not_delayed(autojump_clock: trio.abc.Clock) -> None:
    """Propolis's own steps that Nexus does not see (Stopping -> Stopped) keep the long
    poll going at once: the halt that follows is published with no added delay."""
    fakes = FakeHost()
    async with open_fake_agent(fast_config(), fakes) as h:
        pid = await h.start_vmm()
        await fakes.nexus.wait_for(pid, VmmState.RUNNING)
        vm = fakes.propolis[pid]
        vm.push(InstanceState.STOPPING)
        await fakes.nexus.wait_for(pid, VmmState.STOPPING)
        answers = vm.monitor_answers
        for state in (InstanceState.STOPPED, InstanceState.STOPPING):  # all "stopping"
            vm.push(state)
            await trio.testing.wait_all_tasks_blocked()
        assert vm.monitor_answers == answers + 2  # each step seen, nothing published
        start = trio.current_time()
        vm.push(InstanceState.DESTROYED)
        await fakes.nexus.wait_for(pid, VmmState.DESTROYED)
        assert trio.current_time() - start < 0.01
