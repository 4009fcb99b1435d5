"""Live migration between two sled processes on the real wire (``sim/_sleds.py``).

Two ``sledagent run`` daemons (sleds ``a`` and ``b``: two data directories, two sled ids,
two API addresses) report to one recording Nexus; each runs its simulated Propolis
servers in a ``sledagent sim`` process of its own, and a target Propolis pulls its
guest from the source's over HTTP. The test acts as Nexus. Waits are for events (Nexus
has a state, a Propolis is held before a phase), each under a ``fail_after``.
"""

from __future__ import annotations

import functools
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from sledagent._host import zone_name_for
from sledagent.sim._sleds import SledPair, free_loopback_addr, open_sled_pair


@pytest.fixture
async def sleds(tmp_path: Path) -> AsyncIterator[SledPair]:
    with trio.fail_after(60):
        # Bundles compressed in threads: no archive worker processes to start.
        async with open_sled_pair(tmp_path, extra='archive_in = "thread"\n') as pair:
            yield pair


def vmm_states(updates: list[dict[str, Any]]) -> list[str]:
    return [u["vmm_state"]["state"] for u in updates]


def side(updates: list[dict[str, Any]], key: str) -> list[str]:
    """The distinct states of one side of a migration, in the order Nexus got them."""
    seen: list[str] = []
    for u in updates:
        m = u[key]
        if m is not None and (not seen or seen[-1] != m["state"]):
            seen.append(m["state"])
    return seen


async def no_zones_left(pair: SledPair, sled: str) -> None:
    while pair.sleds[sled].zones():  # noqa: ASYNC110 (zones are directories: nothing to wait on)
        await trio.sleep(0.05)


async def no_zone(pair: SledPair, sled: str, propolis_id: uuid.UUID) -> None:
    while zone_name_for(propolis_id) in pair.sleds[sled].zones():  # noqa: ASYNC110
        await trio.sleep(0.05)


async def test_a_migration_moves_the_guest_and_its_console_to_the_other_sled(
    sleds: SledPair,
) -> None:
    with trio.fail_after(90):
        [src] = await sleds.start_vmms("a", 1)
        await sleds.propolis("a", src, "POST", "/sim/migration-timing?phase_s=0.05")
        r = await sleds.client.post(
            f"http://{sleds.a.propolis_addr(src)}/sim/console", content=b"guest: hello"
        )
        assert r.status_code == 204
        m = await sleds.migrate(src, "a")
        [record] = await sleds.wait_migrations([m.migration_id])
        await sleds.wait_vmms([src], "destroyed")
        assert record["outcome"] == "completed"
        assert await sleds.problems() == []
        # Nexus heard the source migrate out, then end; the target migrate in and run.
        source, target = await sleds.updates(src), await sleds.updates(m.target)
        assert side(source, "migration_out")[-1] == "completed"
        assert vmm_states(source)[-1] == "destroyed"
        assert side(target, "migration_in")[-1] == "completed"
        assert "running" in vmm_states(target)
        answer = (await sleds.state("b", m.target)).json()
        assert answer["vmm_state"]["state"] == "running"
        assert answer["migration_in"]["state"] == "completed"
        # The guest's console history came along.
        console = await sleds.propolis("b", m.target, "GET", "/sim/console")
        assert "guest: hello" in console["console"]
        # The source's zone was bundled (terminated_instance) and torn down.
        await no_zones_left(sleds, "a")
        causes: list[str] = []
        while not causes:  # phase 2 may still be archiving the zone torn down meanwhile
            bundles = (await sleds.client.get(f"{sleds.a.api}/zones/bundles")).json()
            causes = [b["cause"] for b in bundles if str(src) in b["id"]["zone_name"]]
            await trio.sleep(0.05)
        assert causes == ["terminated_instance"]
        assert (await sleds.state("a", src)).status_code == 404
        # Nothing leaks: only the target's zone is left, and it goes with its VMM.
        assert len(sleds.b.zones()) == 1
        r = await sleds.put_state("b", m.target, {"type": "stopped"})
        assert r.status_code == 200, r.text
        await sleds.wait_vmms([m.target], "destroyed")
        await no_zones_left(sleds, "b")


async def held_migration(sleds: SledPair, phase: str = "Device") -> Any:
    """A migration from a to b with both sides under way: the source Propolis holds the
    target's request for ``phase`` until released (``release``)."""
    [src] = await sleds.start_vmms("a", 1)
    await sleds.propolis("a", src, "POST", f"/sim/migration-hold?phase={phase}")
    m = await sleds.migrate(src, "a")
    await sleds.propolis("a", src, "GET", f"/sim/migration?held={phase}&timeout_s=30")
    return m


async def both_sides_in_progress(sleds: SledPair, migration_id: uuid.UUID) -> None:
    while True:
        rows = (await sleds.client.get(f"{sleds.nexus_url}/sim/migrations")).json()
        row = next((r for r in rows if r["migration_id"] == str(migration_id)), None)
        if row and all(
            row[k] and row[k][-1]["state"] == "in_progress" for k in ("source", "target")
        ):
            return
        await trio.sleep(0.05)


async def release(sleds: SledPair, m: Any, phase: str = "Device") -> None:
    await sleds.propolis("a", m.source, "POST", f"/sim/migration-hold?phase={phase}&on=false")


async def kill_propolis(sleds: SledPair, sled: str, propolis_id: uuid.UUID) -> None:
    """The VMM's Propolis process dies (its connections cut, its zone left in place)."""
    url = f"{sleds.sleds[sled].fleet_url()}/fleet/zones/oxz_propolis-server_{propolis_id}"
    r = await sleds.client.delete(url, params={"kill": "true"})
    assert r.status_code == 204


# --- the failures: each scenario is its own migration; all run at once in one pair ----


async def source_dies(sleds: SledPair) -> None:
    m = await held_migration(sleds)
    await kill_propolis(sleds, "a", m.source)  # the target's request is cut
    [record] = await sleds.wait_migrations([m.migration_id])
    assert record["outcome"] == "failed"
    # The source's agent finds its Propolis gone (propolis_unreachable_s): failed.
    await sleds.wait_vmms([m.source, m.target], "failed")
    assert side(await sleds.updates(m.source), "migration_out")[-1] == "failed"
    assert side(await sleds.updates(m.target), "migration_in")[-1] == "failed"
    await no_zone(sleds, "a", m.source)
    await no_zone(sleds, "b", m.target)


async def target_dies(sleds: SledPair) -> None:
    m = await held_migration(sleds)
    await sleds.propolis("a", m.source, "POST", "/sim/migration-timing?idle_s=1")
    await kill_propolis(sleds, "b", m.target)
    await release(sleds, m)  # the source finishes the phase; its target is silent
    [record] = await sleds.wait_migrations([m.migration_id])
    assert record["outcome"] == "failed"
    await sleds.wait_vmms([m.target], "failed")
    answer = (await sleds.state("a", m.source)).json()
    assert answer["vmm_state"]["state"] == "running"  # the guest never left
    assert answer["migration_out"]["state"] == "failed"
    await no_zone(sleds, "b", m.target)
    assert zone_name_for(m.source) in sleds.a.zones()


async def source_refuses_connections(sleds: SledPair) -> None:
    [src] = await sleds.start_vmms("a", 1)
    m = await sleds.migrate(src, "a", src_addr=free_loopback_addr())  # nothing listens
    [record] = await sleds.wait_migrations([m.migration_id])
    assert record["outcome"] == "failed" and record["source"] == []
    updates = await sleds.updates(m.target)
    assert vmm_states(updates)[-1] == "failed"
    assert side(updates, "migration_in")[-1] == "failed"  # never under way
    assert "in_progress" not in side(updates, "migration_in")
    assert (await sleds.state("a", src)).json()["vmm_state"]["state"] == "running"
    await no_zone(sleds, "b", m.target)


async def source_never_answers(sleds: SledPair) -> None:
    """``migration_source_timeout_s`` (5 s here): the source accepts the connection and
    says nothing, forever."""
    heard: list[trio.SocketStream] = []

    async def accept_and_say_nothing(stream: trio.SocketStream) -> None:
        heard.append(stream)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        addr = free_loopback_addr()
        host, port = addr.split(":")
        serve = functools.partial(trio.serve_tcp, host=host)
        await nursery.start(serve, accept_and_say_nothing, int(port))
        [src] = await sleds.start_vmms("a", 1)
        t0 = trio.current_time()
        m = await sleds.migrate(src, "a", src_addr=addr)
        [record] = await sleds.wait_migrations([m.migration_id])
        waited = trio.current_time() - t0
        nursery.cancel_scope.cancel()
    assert heard, "the target never connected to its source"
    assert record["outcome"] == "failed"
    assert waited >= 5.0  # not before the deadline
    assert side(await sleds.updates(m.target), "migration_in")[-1] == "failed"
    await no_zone(sleds, "b", m.target)


async def a_phase_fails(sleds: SledPair) -> None:
    [src] = await sleds.start_vmms("a", 1)
    await sleds.propolis("a", src, "POST", "/sim/migration-fail?phase=Device")
    m = await sleds.migrate(src, "a")
    [record] = await sleds.wait_migrations([m.migration_id])
    assert record["outcome"] == "failed"
    answer = (await sleds.state("a", src)).json()
    assert answer["vmm_state"]["state"] == "running"
    assert answer["migration_out"]["state"] == "failed"
    await sleds.wait_vmms([m.target], "failed")
    assert side(await sleds.updates(m.target), "migration_in")[-1] == "failed"
    await no_zone(sleds, "b", m.target)


async def test_each_injected_failure_fails_the_target_keeps_or_fails_the_source_and_leaks_nothing(
    sleds: SledPair,
) -> None:
    """Source dies mid-migration; target dies; source unreachable; source silent; a
    phase fails on the source. Each is a migration of its own, all at once."""
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            for scenario in (
                source_dies,
                target_dies,
                source_refuses_connections,
                source_never_answers,
                a_phase_fails,
            ):
                nursery.start_soon(scenario, sleds)
        assert await sleds.problems() == []
        assert sleds.b.zones() == []  # every target failed and was reaped


async def test_either_sled_killed_mid_migration_takes_it_back_and_nothing_regresses(
    sleds: SledPair,
) -> None:
    """kill -9 of the source's sled during one migration, then of the target's during
    another; each restarted agent takes its side back from its journal and Propolis."""
    with trio.fail_after(150):
        for sled in ("a", "b"):
            m = await held_migration(sleds)
            pid = m.source if sled == "a" else m.target
            key = "migration_out" if sled == "a" else "migration_in"
            # Nexus has both sides under way: what it was told is on disk (journal first).
            await both_sides_in_progress(sleds, m.migration_id)
            told = (await sleds.updates(pid))[-1]
            await sleds.sleds[sled].stop(signal.SIGKILL)
            await sleds.sleds[sled].start()
            # The journal answers at once, with the migration as Nexus last heard it.
            after = (await sleds.state(sled, pid)).json()
            assert after[key] == told[key]
            assert after["vmm_state"]["gen"] >= told["vmm_state"]["gen"]
            await release(sleds, m)
            [record] = await sleds.wait_migrations([m.migration_id])
            assert record["outcome"] == "completed"
            await sleds.wait_vmms([m.source], "destroyed")
            target = (await sleds.state("b", m.target)).json()
            assert target["vmm_state"]["state"] == "running"
            await no_zone(sleds, "a", m.source)
        # Each side's generations only rose, across the restarts (the ledger checks all).
        assert await sleds.problems() == []
