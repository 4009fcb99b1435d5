"""The API's front process (``_front_main``, ``_front_proc``; issue 21): state reads are
answered by a process of its own and never wait for the agent's thread.

The proofs do not depend on speed: the agent's trio thread is *blocked* (it waits on a
``threading.Event``) while another thread reads; an answer can then only come from the
front process. Every other request is handed to the agent with its connection and must
behave exactly as without the front; a state change is read back at once; the front
dies with the agent and, if it dies alone, the agent serves the port itself.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, Literal, TypeVar

import httpx
import msgspec
import pytest
import trio
import trio.testing

from sledagent import VmmState
from sledagent import _front_proc as front_proc
from sledagent._admission import CpuWait, ReadAdmission, ReadLimits
from sledagent._api import build_app
from sledagent._daemon import DaemonConfig, DaemonInfo, run_daemon
from sledagent._front_channel import LISTEN, PUBLISHING, SERVING, Channel, FrontSettings
from sledagent._front_proc import FrontProcess
from sledagent._http import HttpLimits
from sledagent._server import bind_listeners
from sledagent.testing import RetryOverloaded, ensure_body_json, fast_config, open_fake_agent

from ._front import http_get, kept_alive_on_the_agent, while_blocked

DEADLINE_S = 60
T = TypeVar("T")


@asynccontextmanager
async def daemon(
    tmp_path: Path,
    *,
    token: str | None = None,
    front_process: bool = True,
    archive_in: Literal["process", "thread"] = "process",
) -> AsyncIterator[DaemonInfo]:
    """The daemon on the embedded default. Its front never sheds a read for a
    publication unless a test says the host is short of CPU (``Contended``): a loaded
    test machine must not turn the reads these tests check into 503s."""
    config = DaemonConfig(
        listen="127.0.0.1:0", data_dir=tmp_path / "data", log_rate_bps=1024, seed_log_mb=0.01,
        agent=fast_config(), propolis="sim-inprocess", token=token,
        http=HttpLimits(front_process=front_process), archive_in=archive_in,
    )  # fmt: skip
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        info: DaemonInfo = await nursery.start(run_daemon, config, shutdown)
        if info.front is not None:
            info.front.cpu_wait = CpuWait(read=lambda: 0)
        yield info
        shutdown.set()


def port(info: DaemonInfo) -> int:
    return int(info.api_url.rsplit(":", 1)[1])


async def clients_on_the_agent(
    stack: contextlib.AsyncExitStack, info: DaemonInfo, n: int
) -> list[httpx.AsyncClient]:
    """``n`` clients, each with a kept-alive connection the front has handed to the
    agent (a request other than a state read moves it there)."""
    clients = [
        await stack.enter_async_context(httpx.AsyncClient(base_url=info.api_url)) for _ in range(n)
    ]
    for client in clients:
        assert (await client.get("/zones")).status_code == 200
    return clients


async def start_vmm(api: httpx.AsyncClient, info: DaemonInfo) -> uuid.UUID:
    pid = uuid.uuid4()
    r = await api.put(f"/vmms/{pid}", json=ensure_body_json())
    assert r.status_code == 200, r.text
    r = await api.put(f"/vmms/{pid}/state", json={"state": {"type": "running"}})
    assert r.status_code == 200, r.text
    assert info.recording_nexus is not None
    await info.recording_nexus.wait_for(pid, VmmState.RUNNING)
    return pid


async def test_state_reads_are_answered_while_the_agents_thread_is_blocked(
    tmp_path: Path,
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with daemon(tmp_path) as info, httpx.AsyncClient(base_url=info.api_url) as api:
            assert info.front_pid is not None
            pid = await start_vmm(api, info)
            await info.agent.notifier.wait_idle()
            expected = (await api.get(f"/vmms/{pid}/state")).json()
            status, body = while_blocked(lambda: http_get(port(info), f"/vmms/{pid}/state"))
            assert status == 200
            assert json.loads(body) == expected
            assert json.loads(body)["vmm_state"]["state"] == "running"
            unknown = uuid.uuid4()
            status, body = while_blocked(lambda: http_get(port(info), f"/vmms/{unknown}/state"))
            assert status == 404
            answer = json.loads(body)
            assert answer["error_code"] == "NO_SUCH_INSTANCE"
            assert set(answer) == {"message", "error_code", "request_id"}


async def test_a_state_change_is_read_back_at_once_on_a_new_connection(tmp_path: Path) -> None:
    """Read-your-writes across the two processes: a registration's or a state change's
    answer is never followed by an older state (or a 404) on another connection."""
    with trio.fail_after(DEADLINE_S):
        async with daemon(tmp_path) as info, httpx.AsyncClient(base_url=info.api_url) as api:
            for _ in range(10):
                pid = uuid.uuid4()
                r = await api.put(f"/vmms/{pid}", json=ensure_body_json())
                assert r.status_code == 200, r.text
                registered = r.json()["vmm_state"]["gen"]
                async with httpx.AsyncClient(base_url=info.api_url) as other:
                    r = await other.get(f"/vmms/{pid}/state")
                assert r.status_code == 200, r.text
                assert r.json()["vmm_state"]["gen"] >= registered
                r = await api.put(f"/vmms/{pid}/state", json={"state": {"type": "running"}})
                assert r.status_code == 200, r.text
                changed = r.json()["updated_runtime"]
                async with httpx.AsyncClient(base_url=info.api_url) as other:
                    r = await other.get(f"/vmms/{pid}/state")
                assert r.json()["vmm_state"]["gen"] >= changed["vmm_state"]["gen"]
                r = await api.delete(f"/vmms/{pid}")
                assert r.status_code == 200, r.text
                async with httpx.AsyncClient(base_url=info.api_url) as other:
                    r = await other.get(f"/vmms/{pid}/state")
                assert r.status_code == 404, r.text


async def test_a_registration_is_read_back_on_a_new_connection_while_the_front_lags(
    tmp_path: Path,
) -> None:
    """Read-your-writes when the front cannot keep up with the channel (a host out of
    CPU, a burst of changes): the changes wait in the agent's queue, and registrations
    answered meanwhile were read back as 404 on a new connection. The lag is made
    certain, not timed: the front is stopped (SIGSTOP) with its channel's buffer at the
    minimum, and it reads while the agent's thread is blocked (nothing more is sent)."""
    vmms = 20
    with trio.fail_after(DEADLINE_S):
        async with contextlib.AsyncExitStack() as stack:
            info = await stack.enter_async_context(daemon(tmp_path))
            front, front_pid = info.front, info.front_pid
            assert front is not None and front_pid is not None
            registry = info.agent.manager.registry
            # A connection each, handed over to the agent (a write would do too): the
            # registrations reach the agent with the front stopped.
            clients = await clients_on_the_agent(stack, info, vmms)
            front.channel.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)  # the minimum
            pids = [uuid.uuid4() for _ in range(vmms)]
            answered: dict[uuid.UUID, int] = {}  # what each client was told: the generation

            async def register(api: httpx.AsyncClient, pid: uuid.UUID) -> None:
                r = await api.put(f"/vmms/{pid}", json=ensure_body_json())
                assert r.status_code == 200, r.text
                answered[pid] = r.json()["vmm_state"]["gen"]

            def read_back(told: dict[uuid.UUID, int]) -> list[tuple[int, int, int]]:
                reads = []
                for pid, gen in told.items():
                    status, body = http_get(port(info), f"/vmms/{pid}/state")
                    while status == 503:  # shed by a front that lags: it says retry
                        status, body = http_get(port(info), f"/vmms/{pid}/state")
                    now = json.loads(body)["vmm_state"]["gen"] if status == 200 else -1
                    reads.append((status, now, gen))
                return reads

            os.kill(front_pid, signal.SIGSTOP)
            try:
                async with trio.open_nursery() as nursery:
                    for client, pid in zip(clients, pids, strict=True):
                        nursery.start_soon(register, client, pid)
                    # Every registration journaled, and changes waiting for the front.
                    while not (front.lagging and all(map(registry.answer, pids))):  # noqa: ASYNC110
                        await trio.sleep(0.01)
                    # Let every answer the agent would give now reach its client.
                    await trio.testing.wait_all_tasks_blocked(cushion=0.1)
                    os.kill(front_pid, signal.SIGCONT)
                    told = dict(answered)
                    reads = while_blocked(lambda: read_back(told))
                    assert all(s == 200 and now >= gen for s, now, gen in reads), reads
            finally:
                os.kill(front_pid, signal.SIGCONT)
            reads = await trio.to_thread.run_sync(read_back, answered)
            assert len(reads) == vmms
            assert all(s == 200 and now >= gen for s, now, gen in reads), reads


async def test_a_request_handed_over_when_the_agent_has_no_descriptor_left_is_answered(
    tmp_path: Path,
) -> None:
    """The agent out of descriptors (its soft limit reached: its zones' and peers'
    connections): the kernel dropped each handed-over connection (``MSG_CTRUNC``) and
    its client met a closed connection, unanswered, while idle connections held the
    descriptors. As its accept loop did (issue 16), the agent closes the oldest idle
    connection to make room, and the request is answered."""
    with trio.fail_after(DEADLINE_S):
        # No bundle worker processes: nothing else takes or frees descriptors meanwhile.
        async with daemon(tmp_path, archive_in="thread") as info:
            assert info.front is not None
            await info.front.serving.wait()  # else the agent accepts them itself

            def kept_alive() -> http.client.HTTPConnection:
                return kept_alive_on_the_agent(port(info))

            idle = [await trio.to_thread.run_sync(kept_alive) for _ in range(4)]
            late = socket.create_connection(("127.0.0.1", port(info)), timeout=DEADLINE_S)
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            lowest_free = os.dup(late.fileno())  # descriptors are taken lowest first
            os.close(lowest_free)
            resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))  # none left
            try:
                late.sendall(
                    f"GET /vmms/{uuid.uuid4()}/state?x=1 HTTP/1.1\r\nhost: a\r\n\r\n".encode()
                )
                answer = await trio.to_thread.run_sync(late.recv, 65536)
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            late.close()
            for conn in idle:
                conn.close()
            assert answer.startswith(b"HTTP/1.1 404 "), answer
            assert b"NO_SUCH_INSTANCE" in answer


async def test_every_other_request_is_served_by_the_agent_on_the_same_connection(
    tmp_path: Path,
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with daemon(tmp_path) as info, httpx.AsyncClient(base_url=info.api_url) as api:
            pid = await start_vmm(api, info)
            # One kept-alive connection: a read (front), then requests the agent serves.
            r = await api.get(f"/vmms/{pid}/state")
            assert r.status_code == 200
            r = await api.get("/zones")
            assert r.status_code == 200 and r.json() == [f"oxz_propolis-server_{pid}"]
            r = await api.get(f"/vmms/{pid}/state")
            assert r.status_code == 200
            r = await api.put(
                f"/vmms/{pid}/state",
                content=b"{not json",
                headers={"content-type": "application/json"},
            )
            assert r.status_code == 400
            assert r.json()["request_id"] == r.headers["x-request-id"]
            r = await api.get("/no/such/route")
            assert r.status_code == 404 and r.json()["error_code"] == "NOT_FOUND"
            r = await api.get(f"/vmms/{pid}/state?x=1")  # not the quick shape: the router
            assert r.status_code == 200


async def test_a_request_split_across_packets_is_answered_whole(tmp_path: Path) -> None:
    with trio.fail_after(DEADLINE_S):
        async with daemon(tmp_path) as info, httpx.AsyncClient(base_url=info.api_url) as api:
            pid = await start_vmm(api, info)
            stream = await trio.open_tcp_stream("127.0.0.1", port(info))
            stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await stream.send_all(f"GET /vmms/{pid}/st".encode())
            await trio.sleep(0.05)  # (either way it must be answered whole)
            await stream.send_all(b"ate HTTP/1.1\r\nhost: x\r\n\r\n")
            answer = b""
            while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
                answer += await stream.receive_some()
            assert answer.startswith(b"HTTP/1.1 200 ")
            assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["vmm_state"]["state"] == "running"
            await stream.aclose()


async def test_a_token_is_required_by_the_front_as_by_the_agent(tmp_path: Path) -> None:
    with trio.fail_after(DEADLINE_S):
        async with (
            daemon(tmp_path, token="s3cret") as info,
            httpx.AsyncClient(
                base_url=info.api_url, headers={"authorization": "Bearer s3cret"}
            ) as api,
        ):
            pid = await start_vmm(api, info)
            status, _ = while_blocked(
                lambda: http_get(
                    port(info), f"/vmms/{pid}/state", {"authorization": "Bearer s3cret"}
                )
            )
            assert status == 200
            for wrong in ({}, {"authorization": "Bearer nope"}):
                async with httpx.AsyncClient(base_url=info.api_url, headers=wrong) as other:
                    r = await other.get(f"/vmms/{pid}/state")
                assert r.status_code == 401
                assert r.json()["error_code"] == "UNAUTHORIZED"


async def test_reads_the_front_answered_are_counted_in_the_agents_metrics(tmp_path: Path) -> None:
    with trio.fail_after(DEADLINE_S):
        async with daemon(tmp_path) as info, httpx.AsyncClient(base_url=info.api_url) as api:
            pid = await start_vmm(api, info)
            for _ in range(20):
                assert (await api.get(f"/vmms/{pid}/state")).status_code == 200
            while True:  # the front reports its counters about once a second
                text = (await api.get("/metrics")).text
                admitted = next(
                    float(line.split()[-1])
                    for line in text.splitlines()
                    if line.startswith("sledagent_reads_admitted_total")
                )
                if admitted >= 20:
                    break
                await trio.sleep(0.2)
            assert "sledagent_read_wait_seconds_count" in text


async def test_the_agent_serves_the_port_itself_when_the_front_process_dies(
    tmp_path: Path,
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with (
            daemon(tmp_path) as info,
            httpx.AsyncClient(base_url=info.api_url, transport=RetryOverloaded()) as api,
        ):
            pid = await start_vmm(api, info)
            assert info.front_pid is not None
            os.kill(info.front_pid, signal.SIGKILL)
            # The front's connections went with it; a new one is the agent's.
            for _ in range(5):
                async with httpx.AsyncClient(base_url=info.api_url) as fresh:
                    r = await fresh.get(f"/vmms/{pid}/state")
                assert r.status_code == 200, r.text
                assert r.json()["vmm_state"]["state"] == "running"
            async with httpx.AsyncClient(base_url=info.api_url) as fresh:
                r = await fresh.put(f"/vmms/{pid}/state", json={"state": {"type": "stopped"}})
            assert r.status_code == 200, r.text


async def test_shutdown_ends_the_front_process(tmp_path: Path) -> None:
    with trio.fail_after(DEADLINE_S):
        async with daemon(tmp_path) as info:
            front = info.front_pid
            assert front is not None
            assert http_get(port(info), f"/vmms/{uuid.uuid4()}/state")[0] == 404
        # run_daemon has returned: the front was told to stop and has been reaped.
        try:
            os.kill(front, 0)
        except ProcessLookupError:
            pass
        else:
            raise AssertionError(f"front process {front} outlived the daemon")


async def test_without_the_front_process_the_agent_serves_every_read(tmp_path: Path) -> None:
    with trio.fail_after(DEADLINE_S):
        async with (
            daemon(tmp_path, front_process=False) as info,
            httpx.AsyncClient(base_url=info.api_url) as api,
        ):
            assert info.front_pid is None
            pid = await start_vmm(api, info)
            assert (await api.get(f"/vmms/{pid}/state")).status_code == 200


async def test_a_killed_agent_takes_its_front_with_it_and_the_port_is_free_again(
    tmp_path: Path,
) -> None:
    """kill -9 of the agent: the front process must not keep the API's socket, or the
    next start could not bind it (a restart must cost nothing)."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    free = probe.getsockname()[1]
    probe.close()
    config = tmp_path / "agent.toml"
    config.write_text(
        f'listen = "127.0.0.1:{free}"\ndata_dir = "{tmp_path / "data"}"\n'
        'propolis = "sim-inprocess"\n'
    )
    log = tmp_path / "agent.log"
    argv = [sys.executable, "-c", "from sledagent._cli import main; main()", "run",
            "--config", str(config)]  # fmt: skip
    with trio.fail_after(DEADLINE_S), open(log, "wb") as err:
        agent = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE, stderr=err)
        try:
            assert agent.stdout is not None
            await agent.stdout.receive_some()  # "sledagent listening on ..."
            front = None
            while front is None:
                for line in log.read_text().splitlines():
                    if '"http_front_serving"' in line:
                        front = json.loads(line)["pid"]
                await trio.sleep(0.05)
            status, _ = await trio.to_thread.run_sync(http_get, free, f"/vmms/{uuid.uuid4()}/state")
            assert status == 404
            agent.kill()
            await agent.wait()
            while True:  # it wakes on the channel's end and exits (polled: another process)
                if not _alive(front):
                    break
                await trio.sleep(0.05)
        finally:
            if agent.returncode is None:
                agent.kill()
                await agent.wait()
            if agent.stdout is not None:
                await agent.stdout.aclose()
    rebind = socket.socket()
    rebind.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    rebind.bind(("127.0.0.1", free))  # what the next start does
    rebind.listen()
    rebind.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purpose (its sockets are closed): the front's parent is
    # dead, so init reaps it; until then /proc says "Z".
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    return False


async def test_until_the_front_serves_the_agent_accepts_then_leaves_new_connections_to_it() -> None:
    """A front still importing (a loaded host) must not leave reads in the listen
    backlog: the agent accepts meanwhile. Once the front says it serves, new
    connections go to the front; the agent keeps serving those it has (as it does the
    ones handed to it). Here the test is the front (its end of the channel), and its
    process only sleeps."""
    async with open_fake_agent(fast_config()) as harness, trio.open_nursery() as nursery:
        pid = await harness.start_vmm()
        app = build_app(harness.agent)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sleeper = await trio.lowlevel.open_process(
            [sys.executable, "-c", "import time; time.sleep(600)"]
        )
        front = FrontProcess(sleeper, Channel(ours))
        listeners, urls = await bind_listeners("127.0.0.1:0")
        stop = trio.Event()
        settings = FrontSettings(limits=HttpLimits(), reads=ReadLimits())
        with trio.fail_after(DEADLINE_S):
            await nursery.start(
                partial(front.serve, app, listeners, registry=harness.agent.manager.registry,
                        settings=settings, shutdown=stop)
            )  # fmt: skip
            channel = Channel(theirs)
            async with httpx.AsyncClient(base_url=urls[0]) as api:
                r = await api.get(f"/vmms/{pid}/state")  # the front has not said it serves
                assert r.status_code == 200 and "connection" not in r.headers
                while (message := await channel.receive())[0] != LISTEN:
                    pass  # the registry's answers first, then the sockets
                listening = [socket.socket(fileno=fd) for fd in message[2]]
                await channel.send(SERVING)
                await trio.testing.wait_all_tasks_blocked()
                r = await api.get(f"/vmms/{pid}/state")  # still the agent's connection
                assert r.status_code == 200 and "connection" not in r.headers
                # A new connection waits for the front (this test) to accept it.
                client = await trio.open_tcp_stream("127.0.0.1", int(urls[0].rsplit(":", 1)[1]))
                accepted, _ = await trio.to_thread.run_sync(listening[0].accept)
                await client.send_all(b"GET /x HTTP/1.1\r\nhost: x\r\n\r\n")
                assert (await trio.to_thread.run_sync(accepted.recv, 100)).startswith(b"GET /x")
                accepted.close()
                await client.aclose()
                for sock in listening:
                    sock.close()
            stop.set()
            channel.close()  # the "front" exits: the agent stops waiting for it


async def test_while_the_agent_publishes_behind_time_the_front_refuses_reads_at_once(
    tmp_path: Path,
) -> None:
    """ "Publication first" decided in the front: while halts are being published, the
    agent's thread lags and it waits for a CPU (reads then take CPU the publication
    needs), a read is refused there with 503 and ``Retry-After``, without waiting for
    that thread; once it keeps up, reads are answered again."""
    with trio.fail_after(DEADLINE_S):
        async with daemon(tmp_path) as info, httpx.AsyncClient(base_url=info.api_url) as api:
            pid = await start_vmm(api, info)
            assert info.front is not None and info.admission is not None
            info.front.cpu_wait = Contended()  # the host is short of CPU
            info.admission.backlog = lambda: 3  # three halts on their way to Nexus
            while True:
                if info.front.told_publishing > 0:
                    break
                time.sleep(0.05)  # noqa: ASYNC251  (the agent's thread is behind: it computes)
                # The next batch would be short (it would turn "publication first" off
                # again): only a schedule point here, and the read while still blocked.
                await trio.lowlevel.checkpoint()
            status, body = while_blocked(lambda: http_get(port(info), f"/vmms/{pid}/state"))
            assert status == 503
            refusal = json.loads(body)
            assert refusal["error_code"] == "OVERLOADED"
            assert "publication first" in refusal["message"]
            info.admission.backlog = lambda: 0  # published
            while True:
                if info.front.told_publishing == 0:
                    break
                await trio.sleep(0.03)
            r = await api.get(f"/vmms/{pid}/state")
            assert r.status_code == 200


async def test_with_a_cpu_of_its_own_the_agent_lets_the_front_answer_while_it_publishes(
    tmp_path: Path,
) -> None:
    """On a host where the agent's thread never waits for a CPU, its lag is its own
    work: reads answered by the front on another core cost it nothing, and are served."""
    with trio.fail_after(DEADLINE_S):
        async with daemon(tmp_path) as info, httpx.AsyncClient(base_url=info.api_url) as api:
            pid = await start_vmm(api, info)
            assert info.front is not None and info.admission is not None
            info.front.cpu_wait = CpuWait(read=lambda: 0)  # never waits for a CPU
            info.admission.backlog = lambda: 3
            for _ in range(5):
                time.sleep(0.05)  # noqa: ASYNC251  (the agent's thread is behind)
                await trio.sleep(0.03)
            assert info.front.told_publishing == 0
            status, _ = while_blocked(lambda: http_get(port(info), f"/vmms/{pid}/state"))
            assert status == 200


class Contended(CpuWait):
    def __init__(self) -> None:
        super().__init__(read=lambda: 0)

    def fraction(self) -> float:
        return 1.0


async def test_the_front_serves_reads_again_when_the_agent_goes_idle_after_a_long_batch() -> None:
    """A long batch while halts are published turns "publication first" on in the front;
    if the agent has nothing to do next (no I/O, no timer due) it must still tell the
    front to serve again, not leave it refusing every read until something wakes it."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    theirs.settimeout(DEADLINE_S)
    front = FrontProcess(Any, Channel(ours))  # type: ignore[arg-type]  (no process needed)
    front.cpu_wait = Contended()
    admission = ReadAdmission(lambda: 3)  # halts on their way to Nexus

    def told() -> list[float]:
        values: list[float] = []
        while not values or values[-1] > 0:
            data = theirs.recv(1024)
            assert data[:1] == PUBLISHING
            values.append(msgspec.msgpack.decode(data[1:], type=float))
        return values

    with trio.fail_after(DEADLINE_S):
        async with trio.open_nursery() as nursery:
            unwatch = front.watch_publishing(admission)
            nursery.start_soon(front._flush)
            nursery.start_soon(front.publishing.ends)
            go, never = trio.Event(), trio.Event()

            async def long_batch_then_idle() -> None:
                await go.wait()
                time.sleep(0.05)  # noqa: ASYNC251  (one long batch: the thread computes)
                await never.wait()  # and then nothing: no I/O, no timer

            nursery.start_soon(long_batch_then_idle)
            await trio.testing.wait_all_tasks_blocked()
            go.set()
            # The reader starts in the same batch as the long one; after it the agent's
            # loop has nothing to do.
            values = await trio.to_thread.run_sync(told, abandon_on_cancel=True)
            assert values[0] > 0 and values[-1] == 0.0
            unwatch()
            nursery.cancel_scope.cancel()
    theirs.close()
    ours.close()


async def test_a_stopped_front_is_killed_and_the_agent_serves_the_port_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A front that takes nothing from its channel (SIGSTOP, wedged) would hold every
    answer on the agent's connections (they wait for the changes to reach it) and
    leave new connections in the listen backlog: after ``FRONT_STALL_S`` the agent
    kills it and serves the sockets itself."""
    monkeypatch.setattr(front_proc, "FRONT_STALL_S", 0.5)
    vmms = 20
    with trio.fail_after(DEADLINE_S):
        async with contextlib.AsyncExitStack() as stack:
            info = await stack.enter_async_context(daemon(tmp_path))
            front, front_pid = info.front, info.front_pid
            assert front is not None and front_pid is not None
            clients = await clients_on_the_agent(stack, info, vmms)
            front.channel.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)
            pids = [uuid.uuid4() for _ in range(vmms)]
            os.kill(front_pid, signal.SIGSTOP)
            try:

                async def register(api: httpx.AsyncClient, pid: uuid.UUID) -> None:
                    r = await api.put(f"/vmms/{pid}", json=ensure_body_json())
                    assert r.status_code == 200, r.text

                async with trio.open_nursery() as nursery:
                    for client, pid in zip(clients, pids, strict=True):
                        nursery.start_soon(register, client, pid)
                # Every registration answered: the stalled front was killed.
                assert await front.process.wait() == -signal.SIGKILL
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(front_pid, signal.SIGCONT)
            for pid in pids:  # new connections: the agent's own
                async with httpx.AsyncClient(base_url=info.api_url) as fresh:
                    r = await fresh.get(f"/vmms/{pid}/state")
                assert r.status_code == 200, r.text
