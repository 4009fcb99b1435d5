"""The lean HTTP/1.1 client the agent uses for Propolis and Nexus (``H1Pool``), and the
clients over it: keep-alive reuse, a peer's idle close, refusals, deadlines, cancellation,
bounds, and how answers become ``PeerError``/``PropolisGone``."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial

import h11
import pytest
import trio
import trio.lowlevel
import trio.testing

from sledagent._clients import HttpNexusClient, HttpPropolisClient
from sledagent._errors import PeerError, PropolisGone
from sledagent._h1client import ConnectionFailed, H1Pool, RequestTimeout
from sledagent._wire import InstanceStateRequested, SledVmmState, VmmRuntimeState, VmmState


class Peer:
    """A raw HTTP/1.1 server whose behaviour each test sets."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        self.connections = 0
        self.open_now = 0
        self.in_flight = 0
        self.most_in_flight = 0
        self.status = 204
        self.body = b""
        self.chunked = False
        self.close_after_answer = False  # close the socket, without saying so
        self.delay_s = 0.0
        self.cut_mid_answer = False
        self.closed = trio.Event()
        self.changed = trio.Event()  # set (and replaced) at each arrival, answer and close
        self.hold: trio.Event | None = None  # when set: answers wait for it
        self.answered = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        self.open_now += 1
        conn = h11.Connection(h11.SERVER)
        request: h11.Request | None = None
        body = b""
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    conn.receive_data(data)
                elif isinstance(event, h11.Request):
                    request, body = event, b""
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    assert request is not None
                    headers = {k.decode(): v.decode() for k, v in request.headers}
                    self.requests.append(
                        (request.method.decode(), request.target.decode(), headers, body)
                    )
                    self.in_flight += 1
                    self.most_in_flight = max(self.most_in_flight, self.in_flight)
                    self._changed()
                    try:
                        if self.hold is not None:
                            await self.hold.wait()
                        with trio.move_on_after(self.delay_s):
                            if not await stream.receive_some(65536):
                                return  # the client left before its answer
                    finally:
                        self.in_flight -= 1
                    await self._answer(stream, conn)
                    self.answered += 1
                    self._changed()
                    if self.close_after_answer or self.cut_mid_answer:
                        return
                    conn.start_next_cycle()
                elif isinstance(event, h11.ConnectionClosed):
                    return
        finally:
            self.open_now -= 1
            self.closed.set()
            self._changed()
            await trio.aclose_forcefully(stream)

    def _changed(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def _answer(self, stream: trio.SocketStream, conn: h11.Connection) -> None:
        if self.chunked:
            head = [("transfer-encoding", "chunked")]
        else:
            head = [("content-length", str(len(self.body)))]
        data = conn.send(h11.Response(status_code=self.status, headers=head))
        if self.cut_mid_answer:
            await stream.send_all(data + b"{")  # half a body, then gone
            return
        if self.chunked:
            half = len(self.body) // 2
            data += conn.send(h11.Data(data=self.body[:half]))
            data += conn.send(h11.Data(data=self.body[half:]))
        elif self.body:
            data += conn.send(h11.Data(data=self.body))
        await stream.send_all(data + conn.send(h11.EndOfMessage()))


@asynccontextmanager
async def serving(peer: Peer) -> AsyncIterator[str]:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, peer.handle, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        yield f"http://127.0.0.1:{port}"
        nursery.cancel_scope.cancel()


async def test_requests_reuse_one_kept_alive_connection_and_carry_their_body() -> None:
    peer = Peer()
    peer.status, peer.body = 200, b'{"ok": true}'
    async with serving(peer) as url:
        pool = H1Pool(url)
        for i in range(5):
            answer = await pool.request("PUT", f"/x/{i}", b"abc", headers=[("x-a", "1")])
            assert (answer.status, answer.body) == (200, b'{"ok": true}')
        await pool.aclose()
    assert peer.connections == 1 and pool.connects == 1
    method, target, headers, body = peer.requests[-1]
    assert (method, target, body) == ("PUT", "/x/4", b"abc")
    assert headers["host"] == url.removeprefix("http://")
    assert headers["content-length"] == "3" and headers["x-a"] == "1"


async def test_a_chunked_answer_is_read_whole() -> None:
    peer = Peer()
    peer.status, peer.body, peer.chunked = 200, b"0123456789" * 1000, True
    async with serving(peer) as url:
        pool = H1Pool(url)
        answer = await pool.request("GET", "/big")
        assert answer.body == peer.body
        assert (await pool.request("GET", "/big")).body == peer.body
        await pool.aclose()
    assert peer.connections == 1


async def test_a_connection_the_peer_closed_while_idle_is_replaced_without_an_error() -> None:
    peer = Peer()
    peer.close_after_answer = True  # keep-alive promised, then the socket is closed
    async with serving(peer) as url:
        pool = H1Pool(url)
        for _ in range(3):
            peer.closed = trio.Event()
            assert (await pool.request("PUT", "/x", b"{}")).status == 204
            with trio.fail_after(5):
                await peer.closed.wait()  # the server has dropped it by now
        await pool.aclose()
    assert len(peer.requests) == 3  # each sent once: the stale sockets carried nothing
    assert pool.connects == 3


async def test_a_refused_connection_is_a_connection_failure() -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: refused
        pool = H1Pool(f"http://127.0.0.1:{port}")
        with pytest.raises(ConnectionFailed, match="connect"):
            await pool.request("GET", "/")


async def test_an_answer_cut_off_midway_fails_and_is_not_sent_again() -> None:
    peer = Peer()
    peer.status, peer.body, peer.cut_mid_answer = 200, b'{"a": 1}', True
    async with serving(peer) as url:
        pool = H1Pool(url)
        with pytest.raises(ConnectionFailed):
            await pool.request("PUT", "/x", b"{}")
        await pool.aclose()
    assert len(peer.requests) == 1


async def test_a_slow_answer_times_out_and_its_connection_is_closed(
    mock_clock: trio.testing.MockClock,
) -> None:
    # The deadline runs on a clock the test moves: it expires once the request has
    # reached the peer, whatever the machine's speed.
    peer = Peer()
    peer.delay_s = 10
    async with serving(peer) as url:
        pool = H1Pool(url)
        failures: list[Exception] = []

        async def request() -> None:
            try:
                await pool.request("PUT", "/x", b"{}", timeout_s=0.2)
            except RequestTimeout as exc:
                failures.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(request)
            await until(peer, lambda: len(peer.requests) == 1)  # reached the peer
            mock_clock.jump(0.2)
        (failure,) = failures
        assert str(failure) == f"PUT {url}/x: no answer within 0.2 s"
        await peer.closed.wait()  # the server sees the client leave
        peer.delay_s = 0
        assert (await pool.request("PUT", "/x", b"{}")).status == 204
        await pool.aclose()
    assert pool.connects == 2 and len(peer.requests) == 2


async def test_a_cancelled_long_poll_closes_its_connection(
    mock_clock: trio.testing.MockClock,
) -> None:
    peer = Peer()
    peer.delay_s = 10
    async with serving(peer) as url:
        pool = H1Pool(url)
        async with trio.open_nursery() as nursery:

            async def poll() -> None:
                with trio.move_on_after(0.2):
                    await pool.request("GET", "/instance/state-monitor", b'{"gen": 1}')

            nursery.start_soon(poll)
            await until(peer, lambda: len(peer.requests) == 1)  # the long poll is at the peer
            mock_clock.jump(0.2)
        await peer.closed.wait()  # cancelled: its connection closed, not kept
        await pool.aclose()
    assert peer.answered == 0


async def test_requests_in_flight_stay_within_the_pool_bound() -> None:
    peer = Peer()
    peer.hold = trio.Event()  # the peer answers nothing until released
    with trio.fail_after(10):
        async with serving(peer) as url:
            pool = H1Pool(url, max_connections=2, max_idle=2)
            async with trio.open_nursery() as nursery:
                for _ in range(8):
                    nursery.start_soon(pool.request, "PUT", "/x", b"{}")
                await until(peer, lambda: peer.in_flight == 2)
                # Every task has gone as far as it can: two requests at the peer, six
                # waiting in the pool for a connection.
                await trio.testing.wait_all_tasks_blocked(0.05)
                assert (peer.in_flight, len(peer.requests)) == (2, 2)
                peer.hold.set()
            await pool.aclose()
    assert len(peer.requests) == 8 and peer.answered == 8
    assert peer.most_in_flight == 2 and pool.connects == 2


async def test_an_oversized_answer_is_refused_naming_the_request() -> None:
    peer = Peer()
    peer.status, peer.body, peer.chunked = 200, b"x" * 5000, True
    async with serving(peer) as url:
        pool = H1Pool(url, max_body_bytes=1000)
        with pytest.raises(ConnectionFailed) as caught:
            await pool.request("PUT", "/x", b"{}")
        await pool.aclose()
    # The shape of every other failure: the method and URL, then what went wrong.
    assert str(caught.value) == f"PUT {url}/x: answer body over 1000 bytes"


class Scripted:
    """A raw peer: reads one request head, waits ``delay_s`` (trio's clock), sends
    ``answer`` and then nothing more, until the client leaves."""

    def __init__(self, answer: bytes, delay_s: float = 0.0) -> None:
        self.answer, self.delay_s = answer, delay_s
        self.arrived, self.sent, self.left = trio.Event(), trio.Event(), trio.Event()
        self.sent_at = 0.0

    async def handle(self, stream: trio.SocketStream) -> None:
        try:
            data = b""
            while b"\r\n\r\n" not in data:
                if not (more := await stream.receive_some(65536)):
                    return
                data += more
            self.arrived.set()
            await trio.sleep(self.delay_s)
            await stream.send_all(self.answer)
            self.sent_at = trio.current_time()
            self.sent.set()
            while await stream.receive_some(65536):
                pass
        except trio.BrokenResourceError:
            pass
        finally:
            self.left.set()
            await trio.aclose_forcefully(stream)


@asynccontextmanager
async def serving_script(peer: Scripted) -> AsyncIterator[str]:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, peer.handle, 0, host="127.0.0.1"))
        yield f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        nursery.cancel_scope.cancel()


async def test_an_announced_length_over_the_cap_is_refused_at_the_head() -> None:
    # 100 MB announced, a few bytes sent, then silence: refused on reading the head,
    # not after max_body_bytes were read (nor at the read timeout).
    peer = Scripted(b"HTTP/1.1 200 OK\r\ncontent-length: 100000000\r\n\r\n{")
    with trio.fail_after(10):
        async with serving_script(peer) as url:
            pool = H1Pool(url, read_timeout_s=3600)
            with pytest.raises(ConnectionFailed) as caught:
                await pool.request("PUT", "/vmms/x", b"{}")
            await peer.left.wait()  # its connection closed, never kept
            await pool.aclose()
    assert str(caught.value) == (
        f"PUT {url}/vmms/x: answer body over 8388608 bytes (content-length 100000000)"
    )


STALLED = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 90\r\n\r\n"


@pytest.mark.parametrize(
    "answer",
    [
        STALLED + b'{"gen": 3,',
        STALLED[:20],
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\n",
    ],
    ids=["mid-body", "mid-head", "mid-chunk"],
)
async def test_a_long_poll_waits_for_its_answer_to_begin_but_not_for_a_stalled_body(
    autojump_clock: trio.testing.MockClock, answer: bytes
) -> None:
    # The peer answers after an hour (a long poll may wait that long), then stops
    # mid-answer: the request fails 5 s (``read_timeout_s``) after the last byte.
    peer = Scripted(answer, delay_s=3600)
    with trio.fail_after(7200):  # virtual time: autojump ends a hang here
        async with serving_script(peer) as url:
            pool = H1Pool(url, read_timeout_s=5.0)
            with pytest.raises(RequestTimeout) as caught:
                await pool.request("GET", "/instance/state-monitor", b'{"gen": 1}')
            failed_at = trio.current_time()
            await peer.left.wait()
            await pool.aclose()
    assert str(caught.value) == (
        f"GET {url}/instance/state-monitor: the answer stalled: no byte for 5 s"
    )
    assert failed_at - peer.sent_at == pytest.approx(5.0)


async def test_a_propolis_monitor_answer_that_stalls_is_a_transient_peer_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The QA case: Content-Length 90, 10 bytes, silence. It was never timed out (the VMM
    # stayed ``stopping``); now it is an outage like any other, which the monitor retries.
    peer = Scripted(STALLED + b'{"gen": 3,')
    with trio.fail_after(60):
        async with serving_script(peer) as url:
            client = HttpPropolisClient(H1Pool(url))
            with pytest.raises(PeerError) as caught:
                await client.state_monitor(1)
    assert caught.value.status is None and caught.value.transient
    assert "the answer stalled: no byte for 5 s" in str(caught.value)


async def test_a_nexus_answer_that_stalls_is_a_transient_peer_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    peer = Scripted(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{")
    with trio.fail_after(60):
        async with serving_script(peer) as url:
            nexus = HttpNexusClient(H1Pool(url))
            now = dt.datetime.now(dt.UTC)
            state = SledVmmState(VmmRuntimeState(gen=2, state=VmmState.STOPPED, time_updated=now))
            with pytest.raises(PeerError) as caught:
                await nexus.put_vmm_state(uuid.uuid4(), state)
            failed_at = trio.current_time()
    # Well inside the 30 s whole-request deadline: the stall is what failed it.
    assert failed_at - peer.sent_at == pytest.approx(5.0)
    assert caught.value.status is None and caught.value.transient
    assert "the answer stalled" in str(caught.value)


def test_only_plain_http_urls_make_a_pool() -> None:
    with pytest.raises(ValueError, match="http://host:port"):
        H1Pool("https://nexus.example")


async def test_propolis_answers_become_peer_errors_with_their_codes() -> None:
    peer = Peer()
    async with serving(peer) as url:
        pool = H1Pool(url)
        client = HttpPropolisClient(pool)
        peer.status, peer.body = 410, json.dumps({"message": "no", "error_code": None}).encode()
        with pytest.raises(PropolisGone):
            await client.put_state(InstanceStateRequested.STOP)
        peer.status = 500
        peer.body = json.dumps({"message": "x", "error_code": "NoInstance"}).encode()
        with pytest.raises(PropolisGone):  # Propolis's own "no VM" code, whatever the status
            await client.put_state(InstanceStateRequested.STOP)
        peer.body = b"not json"
        with pytest.raises(PeerError) as caught:
            await client.put_state(InstanceStateRequested.STOP)
        assert caught.value.status == 500 and caught.value.transient
        assert "not json" in str(caught.value)
        await pool.aclose()
    assert peer.requests[0][:2] == ("PUT", "/instance/state")
    assert json.loads(peer.requests[0][3]) == "Stop"


async def test_nexus_unreachable_is_a_transient_peer_error() -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        nexus = HttpNexusClient(H1Pool(url))
        with pytest.raises(PeerError) as caught:
            now = dt.datetime.now(dt.UTC)
            state = SledVmmState(VmmRuntimeState(gen=2, state=VmmState.STOPPED, time_updated=now))
            await nexus.put_vmm_state(uuid.uuid4(), state)
    assert caught.value.status is None and caught.value.transient


async def until(peer: Peer, predicate: Callable[[], bool]) -> None:
    """Wait until ``predicate`` holds, checked at each change of ``peer`` (the test's
    real-time deadline bounds the wait)."""
    while not predicate():
        await peer.changed.wait()


async def test_answers_are_parsed_holding_a_gate_token_but_never_awaited_with_one() -> None:
    """The monitors' shared gate: a long poll waiting for its answer holds no token (or
    one slow Propolis would stall every monitor); an answer that has arrived is parsed
    only once a token is free."""
    slow, fast = Peer(), Peer()
    slow.delay_s = 10
    fast.status, fast.body = 200, b'{"gen": 3}'
    gate = trio.CapacityLimiter(1)
    async with serving(slow) as slow_url, serving(fast) as fast_url:
        slow_pool, fast_pool = H1Pool(slow_url), H1Pool(fast_url)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(slow_pool.request, "GET", "/poll", parse_gate=gate))
            await until(slow, lambda: slow.in_flight == 1)
            with trio.fail_after(5):
                answer = await fast_pool.request("GET", "/a", parse_gate=gate)
            assert answer.body == b'{"gen": 3}'

            holder = object()
            await gate.acquire_on_behalf_of(holder)
            answers: list[bytes] = []

            async def read() -> None:
                answers.append((await fast_pool.request("GET", "/b", parse_gate=gate)).body)

            nursery.start_soon(read)
            await until(fast, lambda: fast.answered == 2)  # the answer was sent
            await trio.testing.wait_all_tasks_blocked(0.05)  # and has arrived, unparsed
            assert answers == []
            gate.release_on_behalf_of(holder)
            while not answers:
                await trio.lowlevel.checkpoint()
            assert answers == [b'{"gen": 3}']
            nursery.cancel_scope.cancel()
        await slow_pool.aclose()
        await fast_pool.aclose()


async def test_a_peer_that_never_completes_the_connection_fails_at_the_connect_deadline(
    mock_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (SYNs dropped by a dead host or a full backlog: the connect hangs.)
    connecting = trio.Event()

    async def never_connects(host: str, port: int) -> trio.SocketStream:
        connecting.set()
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    monkeypatch.setattr("sledagent._h1client.trio.open_tcp_stream", never_connects)
    pool = H1Pool("http://192.0.2.1:12400", connect_timeout_s=5.0)
    failures: list[Exception] = []

    async def request() -> None:
        try:
            await pool.request("PUT", "/vmms/x", b"{}")
        except RequestTimeout as exc:
            failures.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(request)
        await connecting.wait()
        mock_clock.jump(4.9)
        await trio.testing.wait_all_tasks_blocked()
        assert failures == []  # not before the deadline
        mock_clock.jump(0.1)
    (failure,) = failures
    assert str(failure) == "PUT http://192.0.2.1:12400/vmms/x: connect: no answer within 5 s"
    assert pool.connects == 0
