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

from sledagent.sim._sleds import SledPair, free_loopback_addr, open_sled_pair


@pytest.fixture
async def sleds(tmp_path: Path) -> AsyncIterator[SledPair]:
    with trio.fail_after(60):
        async with open_sled_pair(tmp_path) as pair:
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


async def test_a_source_that_dies_mid_migration_fails_both_sides_and_both_zones_go(
    sleds: SledPair,
) -> None:
    with trio.fail_after(90):
        m = await held_migration(sleds)
        await kill_propolis(sleds, "a", m.source)  # the target's request is cut
        [record] = await sleds.wait_migrations([m.migration_id])
        assert record["outcome"] == "failed"
        # The source's agent finds its Propolis gone (propolis_unreachable_s): failed.
        await sleds.wait_vmms([m.source, m.target], "failed")
        assert side(await sleds.updates(m.source), "migration_out")[-1] == "failed"
        assert side(await sleds.updates(m.target), "migration_in")[-1] == "failed"
        assert await sleds.problems() == []
        await no_zones_left(sleds, "a")
        await no_zones_left(sleds, "b")


async def test_a_target_that_dies_mid_migration_leaves_the_source_running(
    sleds: SledPair,
) -> None:
    with trio.fail_after(90):
        m = await held_migration(sleds)
        await sleds.propolis("a", m.source, "POST", "/sim/migration-timing?idle_s=1")
        await kill_propolis(sleds, "b", m.target)
        await release(sleds, m)  # the source finishes the phase; its target is silent
        [record] = await sleds.wait_migrations([m.migration_id])
        assert record["outcome"] == "failed"
        await sleds.wait_vmms([m.target], "failed")
        answer = (await sleds.state("a", m.source)).json()
        assert answer["vmm_state"]["state"] == "running"
        assert answer["migration_out"]["state"] == "failed"
        assert await sleds.problems() == []
        await no_zones_left(sleds, "b")
        assert len(sleds.a.zones()) == 1  # the source's, still running


async def test_a_source_that_refuses_the_connection_fails_the_target_at_once(
    sleds: SledPair,
) -> None:
    with trio.fail_after(60):
        [src] = await sleds.start_vmms("a", 1)
        nowhere = free_loopback_addr()  # nothing listens there
        m = await sleds.migrate(src, "a", src_addr=nowhere)
        [record] = await sleds.wait_migrations([m.migration_id])
        assert record["outcome"] == "failed" and record["source"] == []
        updates = await sleds.updates(m.target)
        assert vmm_states(updates)[-1] == "failed"
        assert side(updates, "migration_in")[-1] == "failed"  # never under way
        assert "in_progress" not in side(updates, "migration_in")
        assert (await sleds.state("a", src)).json()["vmm_state"]["state"] == "running"
        assert await sleds.problems() == []
        await no_zones_left(sleds, "b")


async def test_a_source_that_never_answers_fails_the_target_at_the_deadline(
    sleds: SledPair,
) -> None:
    """``migration_source_timeout_s`` (5 s here): the source accepts the connection and
    says nothing, forever."""
    silent: list[trio.SocketStream] = []

    async def accept_and_say_nothing(stream: trio.SocketStream) -> None:
        silent.append(stream)
        await trio.sleep_forever()

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            addr = free_loopback_addr()
            host, port = addr.split(":")
            await nursery.start(
                functools.partial(trio.serve_tcp, host=host), accept_and_say_nothing, int(port)
            )
            [src] = await sleds.start_vmms("a", 1)
            t0 = trio.current_time()
            m = await sleds.migrate(src, "a", src_addr=addr)
            [record] = await sleds.wait_migrations([m.migration_id])
            waited = trio.current_time() - t0
            nursery.cancel_scope.cancel()
        assert silent, "the target never connected to its source"
        assert record["outcome"] == "failed"
        assert waited >= 5.0  # not before the deadline
        assert side(await sleds.updates(m.target), "migration_in")[-1] == "failed"
        await no_zones_left(sleds, "b")


async def test_a_migration_that_fails_in_a_phase_leaves_the_source_running_and_reaps_the_target(
    sleds: SledPair,
) -> None:
    with trio.fail_after(60):
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
        assert await sleds.problems() == []
        await no_zones_left(sleds, "b")


@pytest.mark.parametrize("sled", ["a", "b"], ids=["source-sled", "target-sled"])
async def test_a_sled_killed_mid_migration_takes_it_back_and_nothing_regresses(
    sleds: SledPair, sled: str
) -> None:
    with trio.fail_after(120):
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
        assert (await sleds.state("b", m.target)).json()["vmm_state"]["state"] == "running"
        # Each side's generations only rose, across the restart (the ledger checks all).
        assert await sleds.problems() == []
        await no_zones_left(sleds, "a")
