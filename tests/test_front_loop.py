"""The front process's own loop (``_front_loop``: epoll, no trio), driven in a thread of
this process with a real listening socket and a fake agent at the other end of the
channel: what the agent's server did at the edges, it must do too.

No test depends on speed: each waits (with a deadline) for what the client or the agent
would see: an answer, a handed-over descriptor, the connection closed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import attrs

from sledagent._admission import ReadLimits
from sledagent._front_channel import HANDOVER, SERVING, STATS, STOP, Channel, FrontSettings
from sledagent._front_loop import FrontLoop
from sledagent._front_main import Replica
from sledagent._http_common import STATS as HTTP_STATS
from sledagent._http_common import HttpLimits

DEADLINE_S = 20.0
READ = b"GET /vmms/1/state HTTP/1.1\r\nhost: x\r\n\r\n"
ANSWER = b"HTTP/1.1 200 \r\ncontent-length: 2\r\n\r\n{}"


def quick(request: bytes, max_head_bytes: int) -> bytes | None:
    """The quick path for these tests: ``READ`` is answered, anything else handed over."""
    return ANSWER if request == READ else None


@attrs.define
class Agent:
    """The agent's end of the channel."""

    channel: Channel

    def receive(self, kind: bytes) -> tuple[bytes, list[int]]:
        """The next message of ``kind`` (others are skipped), within the deadline."""
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline:
            message = self.channel.receive_nowait()
            if message is None:
                time.sleep(0.005)
                continue
            got, payload, fds = message
            if got == kind:
                return payload, fds
            for fd in fds:
                socket.socket(fileno=fd).close()
        raise AssertionError(f"no {kind!r} message from the front")


@attrs.define
class Running:
    loop: FrontLoop
    agent: Agent
    port: int
    thread: threading.Thread

    def connect(self) -> socket.socket:
        client = socket.create_connection(("127.0.0.1", self.port), timeout=DEADLINE_S)
        return client


@contextmanager
def front_loop(
    limits: HttpLimits | None = None,
    answer: Callable[[bytes, int], bytes | None] = quick,
    listener: socket.socket | None = None,
) -> Iterator[Running]:
    agent_end, front_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    channel = Channel(front_end)
    replica = Replica(channel)
    limits = limits or HttpLimits()
    replica.listen = (FrontSettings(limits=limits, reads=ReadLimits()), [])
    if listener is None:
        listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    loop = FrontLoop(channel, replica, [listener], limits)
    loop.answer = answer
    loop.stats = lambda: b"counters"
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    agent = Agent(Channel(agent_end))
    agent.receive(SERVING)
    try:
        yield Running(loop, agent, port, thread)
    finally:
        agent_end.close()
        thread.join(DEADLINE_S)
        assert not thread.is_alive()


def read_answer(client: socket.socket, size: int = len(ANSWER)) -> bytes:
    data = b""
    while len(data) < size:
        chunk = client.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def closed_by_server(client: socket.socket) -> bool:
    """Whether the server closes the connection (EOF or reset) within the deadline."""
    client.settimeout(DEADLINE_S)
    try:
        return client.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_a_quick_read_is_answered_and_the_next_request_is_handed_over_with_its_bytes() -> None:
    with front_loop() as front, front.connect() as client:
        for _ in range(3):  # keep-alive: the same connection, read after read
            client.sendall(READ)
            assert read_answer(client) == ANSWER
        other = b"PUT /vmms/1/state HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}"
        client.sendall(other)
        payload, fds = front.agent.receive(HANDOVER)
        assert payload == other
        assert len(fds) == 1
        with socket.socket(fileno=fds[0]) as handed:  # the agent answers on it
            handed.sendall(b"HTTP/1.1 204 \r\n\r\n")
        assert read_answer(client, 17) == b"HTTP/1.1 204 \r\n\r\n"
        assert front.loop.handed_over == 1


def test_past_the_connection_cap_the_oldest_idle_connection_makes_room() -> None:
    before = HTTP_STATS.idle_closed
    with front_loop(HttpLimits(max_connections=2)) as front:
        first, second = front.connect(), front.connect()
        for client in (first, second):  # both accepted, answered, idle
            client.sendall(READ)
            assert read_answer(client) == ANSWER
        with front.connect() as third:
            third.sendall(READ)
            assert read_answer(third) == ANSWER
        assert closed_by_server(first)
        second.sendall(READ)
        assert read_answer(second) == ANSWER
        first.close()
        second.close()
    assert HTTP_STATS.idle_closed == before + 1


def test_an_idle_connection_is_closed_after_its_keep_alive() -> None:
    with front_loop(HttpLimits(keep_alive_s=0.2)) as front, front.connect() as client:
        client.sendall(READ)
        assert read_answer(client) == ANSWER
        assert closed_by_server(client)


def test_stop_closes_idle_connections_sends_the_last_counters_and_ends() -> None:
    with front_loop() as front, front.connect() as client:
        client.sendall(READ)
        assert read_answer(client) == ANSWER
        assert front.agent.channel.send_nowait(STOP)
        payload, _ = front.agent.receive(STATS)
        assert payload == b"counters"
        assert closed_by_server(client)
        front.thread.join(DEADLINE_S)
        assert not front.thread.is_alive()
        try:  # the listening socket is closed: the port is free
            socket.create_connection(("127.0.0.1", front.port), timeout=1).close()
            refused = False
        except ConnectionRefusedError:
            refused = True
        assert refused


def test_the_loop_ends_at_once_when_the_agent_goes_away() -> None:
    with front_loop() as front, front.connect() as client:
        client.sendall(READ)
        assert read_answer(client) == ANSWER
        front.agent.channel.close()
        front.thread.join(DEADLINE_S)
        assert not front.thread.is_alive()
        assert closed_by_server(client)


def test_an_answer_the_client_does_not_read_yet_waits_without_holding_up_others() -> None:
    big = b"HTTP/1.1 200 \r\ncontent-length: %d\r\n\r\n" % (8 << 20) + b"x" * (8 << 20)

    def answer(request: bytes, max_head_bytes: int) -> bytes | None:
        return big if b"/big" in request else quick(request, max_head_bytes)

    with front_loop(answer=answer) as front, front.connect() as slow, front.connect() as fast:
        slow.sendall(READ.replace(b"/1/", b"/big/"))  # and does not read for now
        for _ in range(3):
            fast.sendall(READ)
            assert read_answer(fast) == ANSWER
        assert read_answer(slow, len(big)) == big  # whole, once it reads
        slow.sendall(READ)  # and the connection goes on
        assert read_answer(slow) == ANSWER


class _OutOfDescriptors(socket.socket):
    """A listener whose next ``failures`` accepts fail as with no descriptor left."""

    failures = 0

    def accept(self) -> tuple[socket.socket, object]:
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        return super().accept()


def _flaky_listener() -> _OutOfDescriptors:
    listener = _OutOfDescriptors(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    return listener


def test_out_of_descriptors_an_idle_connection_is_closed_to_accept_the_new_one() -> None:
    before = HTTP_STATS.accept_errors.get("EMFILE", 0)
    listener = _flaky_listener()
    with front_loop(listener=listener) as front, front.connect() as idle:
        idle.sendall(READ)
        assert read_answer(idle) == ANSWER
        listener.failures = 1
        with front.connect() as client:
            client.sendall(READ)
            assert read_answer(client) == ANSWER
        assert closed_by_server(idle)
    assert HTTP_STATS.accept_errors.get("EMFILE", 0) == before + 1


def test_out_of_descriptors_with_none_idle_accepting_pauses_then_resumes() -> None:
    listener = _flaky_listener()
    with front_loop(listener=listener) as front:
        listener.failures = 3  # backs off 10, 20, 40 ms, then accepts
        with front.connect() as client:
            client.sendall(READ)
            assert read_answer(client) == ANSWER
        assert listener.failures == 0


@contextmanager
def descriptors_exhausted() -> Iterator[None]:
    """Every descriptor of this process (the loop's thread included) in use until the
    block ends: the soft RLIMIT_NOFILE lowered to the highest one open, then the holes
    below it filled."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 1, hard))
    fillers: list[int] = []
    try:
        with contextlib.suppress(OSError):
            while True:
                fillers.append(os.open(os.devnull, os.O_RDONLY))
        yield
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_out_of_descriptors_a_new_connection_costs_one_idle_connection_not_two() -> None:
    """Linux fails accept(2) with EMFILE before it looks for a connection: after the one
    that came is accepted, the next try fails too with none waiting. Closing an idle
    connection for that one closed a client's kept-alive connection for nothing (the
    agent's accept loop waits for a connection first)."""
    with front_loop() as front, front.connect() as oldest, front.connect() as kept:
        for client in (oldest, kept):
            client.sendall(READ)
            assert read_answer(client) == ANSWER
        new = socket.socket()  # its descriptor before there are none
        new.settimeout(DEADLINE_S)
        with new, descriptors_exhausted():
            new.connect(("127.0.0.1", front.port))
            new.sendall(READ)
            assert read_answer(new) == ANSWER
            assert closed_by_server(oldest)  # closed to make room for it
            kept.sendall(READ)
            assert read_answer(kept) == ANSWER  # and no other
