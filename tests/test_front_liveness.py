"""The front process's liveness as the agent watches it (``_front_proc``; issue 21, QA).

A front that serves the API's sockets but stops running (SIGSTOP, a wedged loop) holds
every new connection in the listen backlog: with no state change waiting for it, the
agent never noticed, and every request (reads and writes alike) timed out. The front's
counters come about once a second (``_front_loop.STATS_EVERY_S``); silence from it for
``FRONT_SILENT_S`` means it is stalled: it is killed and the agent serves the port.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import resource
import signal
import socket
import uuid
from pathlib import Path

import httpx
import pytest
import trio

from sledagent import _front_proc as front_proc
from sledagent._front_loop import STATS_EVERY_S

from ._front import kept_alive_on_the_agent
from .test_front_process import daemon, port

DEADLINE_S = 60


async def test_a_stopped_front_with_nothing_to_send_it_is_killed_and_the_agent_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Longer than the front's counters' period: a running front is never silent that long
    # (if a loaded host made it so, it would be killed and the agent would answer: the
    # outcome checked here is the same).
    monkeypatch.setattr(front_proc, "FRONT_SILENT_S", STATS_EVERY_S * 3)
    with trio.fail_after(DEADLINE_S):
        async with daemon(tmp_path) as info:
            front, front_pid = info.front, info.front_pid
            assert front is not None and front_pid is not None
            await front.serving.wait()
            os.kill(front_pid, signal.SIGSTOP)
            try:
                # Nothing changes in the registry: only the front's silence tells.
                async with httpx.AsyncClient(base_url=info.api_url, timeout=DEADLINE_S) as api:
                    r = await api.get(f"/vmms/{uuid.uuid4()}/state")
                    assert r.status_code == 404, r.text
                    assert r.json()["error_code"] == "NO_SUCH_INSTANCE"
                    r = await api.get("/zones")
                    assert r.status_code == 200, r.text
                assert await front.process.wait() == -signal.SIGKILL
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(front_pid, signal.SIGCONT)


async def test_a_dead_fronts_connections_are_no_longer_counted_as_open(tmp_path: Path) -> None:
    """``sledagent_http_connections`` is a gauge: the connections a front held when it died
    closed with it. They stayed in the gauge for the agent's whole life (an operator
    watching it against ``max_connections`` saw connections that did not exist)."""
    held = 20

    async def open_connections(api: httpx.AsyncClient) -> float:
        text = (await api.get("/metrics")).text
        found = re.search(r"^sledagent_http_connections (\S+)$", text, re.M)
        assert found is not None, text
        return float(found[1])

    with trio.fail_after(DEADLINE_S):
        async with daemon(tmp_path) as info:
            front, front_pid = info.front, info.front_pid
            assert front is not None and front_pid is not None
            await front.serving.wait()
            idle = [socket.create_connection(("127.0.0.1", port(info))) for _ in range(held)]
            try:
                async with httpx.AsyncClient(base_url=info.api_url) as api:
                    while True:  # the front reports its counters about once a second
                        if await open_connections(api) >= held:
                            break
                        await trio.sleep(0.1)
                os.kill(front_pid, signal.SIGKILL)
                await front.process.wait()
            finally:
                for sock in idle:
                    sock.close()
            # A new connection is the agent's once it knows the front is gone.
            async with httpx.AsyncClient(base_url=info.api_url) as api:
                assert await open_connections(api) < held


async def test_out_of_descriptors_a_handed_over_connection_costs_one_idle_connection(
    tmp_path: Path,
) -> None:
    """The agent out of descriptors closes its oldest idle connection for a connection
    the front hands over, and no other: it made room again before it looked whether
    anything more came, closing a second client's kept-alive connection for nothing."""
    with trio.fail_after(DEADLINE_S):
        # No bundle worker processes: nothing else takes or frees descriptors meanwhile.
        async with daemon(tmp_path, archive_in="thread") as info:
            assert info.front is not None
            await info.front.serving.wait()  # else the agent accepts them itself

            def kept_alive() -> http.client.HTTPConnection:
                return kept_alive_on_the_agent(port(info))

            def still_answers(conn: http.client.HTTPConnection) -> bool:
                try:
                    conn.request("GET", "/no/such/route")
                    return conn.getresponse().status == 404
                except (ConnectionError, http.client.HTTPException):
                    return False

            idle = [await trio.to_thread.run_sync(kept_alive) for _ in range(4)]
            late = socket.create_connection(("127.0.0.1", port(info)), timeout=DEADLINE_S)
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            lowest_free = os.dup(late.fileno())  # descriptors are taken lowest first
            os.close(lowest_free)
            resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))  # none left
            try:
                late.sendall(b"GET /zones HTTP/1.1\r\nhost: a\r\n\r\n")
                answer = await trio.to_thread.run_sync(late.recv, 65536)
                assert answer.startswith(b"HTTP/1.1 200 "), answer
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            late.close()
            answering = [await trio.to_thread.run_sync(still_answers, c) for c in idle]
            for conn in idle:
                conn.close()
            assert answering == [False, True, True, True]  # the oldest made room
