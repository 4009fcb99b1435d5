"""The write-ahead journal: what is promised is on disk before anyone is told, and read
back whole after a crash (registrations, states, acknowledgements, closes)."""

from __future__ import annotations

import json
import sqlite3
import threading
import uuid
from pathlib import Path

import attrs
import pytest
import trio

from sledagent import VmmPhase, VmmState
from sledagent._agent import open_sled_agent
from sledagent._journal import LEGACY_NAME, JournalError, StateJournal
from sledagent._vmm_state import initial_state
from sledagent._wire import (
    SledVmmState,
    VmmRuntimeState,
    VmmStateRequested,
    VmmStateRequestedType,
    utcnow,
)
from sledagent.testing import AgentHarness, FakeHost, ensure_body, fast_config


def _rows(path: Path) -> dict[str, dict[str, object]]:
    """The journal as another process would read it (what is on disk now)."""
    db = sqlite3.connect(path)
    try:
        db.row_factory = sqlite3.Row
        return {r["propolis_id"]: dict(r) for r in db.execute("SELECT * FROM vmm")}
    finally:
        db.close()


def _state(gen: int, state: VmmState = VmmState.RUNNING):  # type: ignore[no-untyped-def]
    return initial_state(
        VmmRuntimeState(gen=gen, state=state, time_updated=utcnow()), None, utcnow()
    )


async def test_a_registration_is_answered_only_once_it_is_on_disk_whole(tmp_path: Path) -> None:
    fakes = FakeHost(journal_path=tmp_path / "journal.sqlite3")
    pid, body = uuid.uuid4(), ensure_body()
    with trio.fail_after(30):
        async with open_sled_agent(fast_config(shutdown_drain_s=0.2), fakes.host()) as agent:
            await agent.manager.register_durably(pid, body)
            # On disk before the answer: a crash right now still leaves the whole VMM.
            row = _rows(tmp_path / "journal.sqlite3")[str(pid)]
    registration = json.loads(str(row["registration"]))
    assert registration["instance_id"] == str(body.instance_id)
    assert registration["propolis_addr"] == body.propolis_addr
    assert registration["vmm_spec"] == body.vmm_spec
    loaded = await StateJournal(tmp_path / "journal.sqlite3").load()
    assert loaded[pid].registration == body
    assert loaded[pid].state.vmm_state.state is VmmState.STARTING


def hold_writes(journal: StateJournal) -> tuple[threading.Event, threading.Event]:
    """Hold the disk: the writer's next batch blocks in its thread (``entered`` is set)
    until ``release`` is."""
    entered, release = threading.Event(), threading.Event()
    write = journal._write

    def slow_write(*args: object) -> None:
        entered.set()
        release.wait(30)
        write(*args)  # type: ignore[arg-type]

    journal._write = slow_write  # type: ignore[method-assign]
    return entered, release


async def test_a_state_reaches_nexus_only_after_it_is_on_disk(tmp_path: Path) -> None:
    fakes = FakeHost(journal_path=tmp_path / "journal.sqlite3")
    with trio.fail_after(30):
        async with open_sled_agent(fast_config(shutdown_drain_s=0.5), fakes.host()) as agent:
            pid = await AgentHarness(agent, fakes).start_vmm()
            await fakes.nexus.wait_for(pid, VmmState.RUNNING)
            journal = agent.notifier.journal
            assert journal is not None
            entered, release = hold_writes(journal)
            fakes.propolis[pid].halt()
            await trio.to_thread.run_sync(entered.wait, 30)
            await trio.testing.wait_all_tasks_blocked()
            assert fakes.nexus.first_time(pid, VmmState.DESTROYED) is None
            assert '"destroyed"' not in str(_rows(tmp_path / "journal.sqlite3")[str(pid)]["state"])
            release.set()
            await fakes.nexus.wait_for(pid, VmmState.DESTROYED)
            await agent.drain()
    assert str(pid) not in _rows(tmp_path / "journal.sqlite3")  # Nexus answered: closed


@pytest.mark.parametrize("change", ["stop", "unregister", "read"])
async def test_a_state_is_answered_only_once_it_is_on_disk(change: str, tmp_path: Path) -> None:
    """An answer is a promise: a stop answered ``stopping`` at gen 3, then a kill before
    the journal write, made the next start publish ``destroyed`` at gen 3 (the same
    generation, other content); an unregister answered ``destroyed`` was taken back as
    ``running`` (a QA drill on issue 18). Every answer waits for the journal."""
    fakes = FakeHost(journal_path=tmp_path / "journal.sqlite3")
    with trio.fail_after(30):
        async with open_sled_agent(fast_config(shutdown_drain_s=0.5), fakes.host()) as agent:
            pid = await AgentHarness(agent, fakes).start_vmm()
            await fakes.nexus.wait_for(pid, VmmState.RUNNING)
            journal = agent.notifier.journal
            assert journal is not None
            entered, release = hold_writes(journal)
            answers: list[SledVmmState] = []

            async def ask() -> None:
                if change == "stop":
                    stop = VmmStateRequested(VmmStateRequestedType.STOPPED)
                    answers.append((await agent.manager.put_state(pid, stop)).updated_runtime)
                elif change == "unregister":
                    r = await agent.manager.unregister(pid)
                    assert r.updated_runtime is not None
                    answers.append(r.updated_runtime)
                else:
                    fakes.propolis[pid].halt()  # a change the runner publishes
                    await trio.to_thread.run_sync(entered.wait, 30)
                    answers.append(await agent.manager.get_state(pid))
                # What the answer says is on disk by the time it is given.
                assert agent.notifier.is_journaled(pid)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask)
                await trio.to_thread.run_sync(entered.wait, 30)
                await trio.testing.wait_all_tasks_blocked()
                assert answers == []  # not while the state is only in memory
                release.set()
            assert answers[0].vmm_state.gen >= 3  # the change itself (or a later state)
            await agent.drain()


async def test_a_journal_on_a_failing_disk_is_logged_and_publishing_goes_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fakes = FakeHost(journal_path=tmp_path / "journal.sqlite3")
    with trio.fail_after(30):
        async with open_sled_agent(fast_config(shutdown_drain_s=0.5), fakes.host()) as agent:
            journal = agent.notifier.journal
            assert journal is not None

            def broken_disk(*args: object) -> None:
                raise sqlite3.OperationalError("disk I/O error")

            journal._write = broken_disk  # type: ignore[method-assign]
            pid = await AgentHarness(agent, fakes).start_vmm()
            fakes.propolis[pid].halt()
            await fakes.nexus.wait_for(pid, VmmState.DESTROYED)
            await agent.drain()
    out = capsys.readouterr().out
    assert "journal_write_failed" in out and "disk I/O error" in out


async def test_a_terminal_state_nexus_never_acknowledged_is_delivered_after_a_restart(
    tmp_path: Path,
) -> None:
    fakes = FakeHost(journal_path=tmp_path / "journal.sqlite3")
    with trio.fail_after(30):
        async with open_sled_agent(fast_config(shutdown_drain_s=0.2), fakes.host()) as agent:
            h = AgentHarness(agent, fakes)
            pid = await h.start_vmm()
            fakes.nexus.fail_for(3600.0)  # Nexus is down: the halt is never acknowledged
            fakes.propolis[pid].halt()
            entry = agent.manager.registry.get(pid)
            await entry.wait_until(lambda e: e.phase is not VmmPhase.ACTIVE)
            while agent.notifier.statistics().retries < 1:  # noqa: ASYNC110 (tried: on disk)
                await trio.sleep(0.01)
            halted = entry.state
        # The agent is gone (a crash, as far as Nexus knows). Nexus comes back; a new
        # agent starts on the same host and journal.
        assert fakes.nexus.first_time(pid, VmmState.DESTROYED) is None
        async with open_sled_agent(fast_config(), fakes.host()) as agent:
            # Held until Nexus answers: a read is never a 404 meanwhile. (Nexus stays
            # down until the read is made, or the entry could already be gone.)
            assert (await agent.manager.get_state(pid)) == halted
            fakes.nexus.fail_for(0.0)
            await fakes.nexus.wait_for(pid, VmmState.DESTROYED)
            await agent.notifier.wait_idle()  # Nexus's answer reached the agent
            await agent.drain()
    assert fakes.nexus.latest(pid) == halted  # the same state, the same generation
    assert await StateJournal(tmp_path / "journal.sqlite3").load() == {}


async def test_closed_vmms_leave_nothing_behind_however_many_pass_through(
    tmp_path: Path,
) -> None:
    journal = StateJournal(tmp_path / "journal.sqlite3")
    await journal.load()
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        keep = uuid.uuid4()
        await journal.durable(journal.record_registration(keep, ensure_body(), _state(1)))
        for _ in range(3000):  # VMMs that come and go
            pid = uuid.uuid4()
            journal.record_registration(pid, ensure_body(), _state(1))
            journal.record(pid, _state(2, VmmState.DESTROYED))
            journal.delivered(pid, 2)
            await trio.lowlevel.checkpoint()
        await journal.durable(journal.record(keep, _state(2)))
        nursery.cancel_scope.cancel()
    assert list(_rows(tmp_path / "journal.sqlite3")) == [str(keep)]
    loaded = await StateJournal(tmp_path / "journal.sqlite3").load()
    assert set(loaded) == {keep} and loaded[keep].state.gen == 2


async def test_a_registration_an_older_version_accepted_keeps_its_vmm_as_not_readoptable(
    tmp_path: Path,
) -> None:
    """A journaled ``propolis_addr`` this version refuses (an older one took it) must not
    stop the start nor drop the VMM unseen: it is kept without its registration (it then
    ends ``failed``, its zone bundled)."""
    path = tmp_path / "journal.sqlite3"
    journal = StateJournal(path)
    await journal.load()
    pid, fine = uuid.uuid4(), uuid.uuid4()
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        journal.record_registration(fine, ensure_body(), _state(2))
        await journal.durable(journal.record_registration(pid, ensure_body(), _state(2)))
        nursery.cancel_scope.cancel()
    db = sqlite3.connect(path)
    with db:
        (text,) = db.execute("SELECT registration FROM vmm WHERE propolis_id = ?", (str(pid),))
        old = json.loads(text[0]) | {"propolis_addr": "127.0.0.1:99999"}
        db.execute(
            "UPDATE vmm SET registration = ? WHERE propolis_id = ?", (json.dumps(old), str(pid))
        )
    db.close()
    loaded = await StateJournal(path).load()
    assert set(loaded) == {pid, fine}
    assert loaded[pid].registration is None and loaded[pid].state.gen == 2
    assert loaded[fine].registration is not None


async def test_an_older_state_never_overwrites_a_newer_one(tmp_path: Path) -> None:
    journal = StateJournal(tmp_path / "journal.sqlite3")
    await journal.load()
    pid = uuid.uuid4()
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        journal.record_registration(pid, ensure_body(), _state(1))
        journal.record(pid, _state(5))
        await journal.durable(journal.record(pid, _state(3, VmmState.STOPPING)))
        journal.acknowledged(pid, 5)
        await journal.durable(journal.mark(pid, ensured=True, seen_live=True))
        nursery.cancel_scope.cancel()
    vmm = (await StateJournal(tmp_path / "journal.sqlite3").load())[pid]
    assert (vmm.state.gen, vmm.state.vmm_state.state) == (5, VmmState.RUNNING)
    assert (vmm.acked_gen, vmm.ensured, vmm.seen_live) == (5, True, True)
    assert not vmm.unacknowledged


async def test_a_journal_of_the_json_lines_format_is_imported_once_torn_line_and_all(
    tmp_path: Path,
) -> None:
    a, b, c = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()

    def line(op: str, pid: uuid.UUID, **fields: object) -> str:
        return json.dumps({"op": op, "propolis_id": str(pid), **fields})

    destroyed = json.loads(json.dumps(attrs.asdict(_state(5, VmmState.DESTROYED)), default=str))
    running = json.loads(json.dumps(attrs.asdict(_state(3)), default=str))
    legacy = tmp_path / LEGACY_NAME
    legacy.write_text(
        "\n".join(
            [
                line("state", a, state=destroyed),
                line("state", b, state=destroyed),
                line("done", b, gen=5),
                line("state", c, state=running),
            ]
        )
        + '\n{"op":"state","propolis_id":"'  # a crash mid-append
    )
    loaded = await StateJournal(tmp_path / "journal.sqlite3").load()
    assert set(loaded) == {a, c}
    assert loaded[a].state.vmm_state.state is VmmState.DESTROYED and loaded[a].registration is None
    assert loaded[c].state.gen == 3
    assert not legacy.exists()
    assert set(await StateJournal(tmp_path / "journal.sqlite3").load()) == {a, c}


async def test_a_journal_that_cannot_be_opened_stops_the_start_with_its_path(
    tmp_path: Path,
) -> None:
    path = tmp_path / "journal.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(JournalError, match=r"journal\.sqlite3"):
        await StateJournal(path).load()
