"""The quick path never takes a request h11 would refuse (issue 16, RFC 9112).

``simple_get_target`` is the quick path's whole judgement of a request (``_http``'s
``_quick`` answers only what it accepts): whatever it accepts, h11 must read as one
bodyless ``GET`` of the same target; two ``Host`` headers (the QA case), a folded line, a
space before a colon, a bad name or value, a body: h11 refuses or reads otherwise, and the
quick path hands them to h11.
"""

from __future__ import annotations

import uuid

import h11
import pytest
import trio
from hypothesis import example, given, note, settings
from hypothesis import strategies as st

from sledagent._quick_shape import simple_get_target

from .test_http_robustness import serving_the_api

MAX_HEAD = 16 * 1024


def h11_reads(data: bytes) -> tuple[str, bytes] | None:
    """How h11 (as our server configures it) reads ``data``: ("GET", target) for one
    whole bodyless request and nothing else; None if it refuses it or reads otherwise."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    conn.receive_data(data)
    try:
        request = conn.next_event()
        end = conn.next_event()
    except h11.RemoteProtocolError:
        return None
    if not isinstance(request, h11.Request) or not isinstance(end, h11.EndOfMessage):
        return None
    if conn.trailing_data != (b"", False):
        return None
    return request.method.decode(), request.target


NAMES = st.sampled_from(
    [b"host", b"Host", b"HOST", b"accept", b"x-a", b"authorization", b"content-length",
     b"transfer-encoding", b"connection", b"expect", b"te", b"upgrade", b"x a", b"x\x00",
     b"", b"h\xe9", b"x/y", b"host "]
)  # fmt: skip
VALUES = st.one_of(
    st.sampled_from([b"", b"a", b"a b", b" a ", b"\ta", b"0", b"chunked", b"close", b"keep-alive",
                     b"100-continue", b"Bearer t", b"a\x00b", b"\xe9", b"a\rb", b"a\x0bb"]),
    st.binary(max_size=8),
)  # fmt: skip
SEPARATORS = st.sampled_from([b":", b": ", b":\t", b" :", b"\t:", b": "])
ENDINGS = st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r"])


@st.composite
def header_lines(draw: st.DrawFn) -> bytes:
    if draw(st.integers(0, 9)) == 0:  # obs-fold: a continuation of the line before
        return draw(st.sampled_from([b" ", b"\t"])) + draw(VALUES) + b"\r\n"
    return draw(NAMES) + draw(SEPARATORS) + draw(VALUES) + draw(ENDINGS)


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    line = draw(
        st.sampled_from(
            [b"GET /vmms/x/state HTTP/1.1\r\n", b"GET /a?b HTTP/1.1\r\n", b"GET / HTTP/1.0\r\n",
             b"HEAD /a HTTP/1.1\r\n", b"GET  /a HTTP/1.1\r\n", b"GET /a HTTP/1.1\n",
             b"GET a HTTP/1.1\r\n", b"GET /\xe9 HTTP/1.1\r\n"]
        )
    )  # fmt: skip
    hosts = draw(
        st.lists(st.sampled_from([b"host: a\r\n", b"Host: b\r\n", b"HOST:\r\n"]), max_size=3)
    )
    others = draw(st.lists(header_lines(), max_size=4))
    headers = draw(st.permutations(hosts + others))
    tail = draw(st.sampled_from([b"", b"", b"", b"x", b"GET / HTTP/1.1\r\nhost: a\r\n\r\n"]))
    return line + b"".join(headers) + b"\r\n" + tail


@settings(max_examples=1500, deadline=None)
@given(requests())
@example(b"GET /vmms/x/state HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")  # the QA case
@example(b"GET /vmms/x/state HTTP/1.1\r\nHost: a\r\nx-a: b\r\n c\r\n\r\n")  # obs-fold
@example(b"GET /vmms/x/state HTTP/1.1\r\nHost : a\r\n\r\n")
@example(b"GET /vmms/x/state HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n")
@example(b"GET /vmms/x/state HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
@example(b"GET /vmms/x/state HTTP/1.1\r\n\r\n")  # no Host
def test_the_quick_path_never_takes_a_request_h11_would_refuse(data: bytes) -> None:
    target = simple_get_target(data, MAX_HEAD)
    read = h11_reads(data)
    note(f"quick: {target!r}; h11: {read!r}")
    if target is not None:
        assert read == ("GET", target)


def test_a_plain_state_read_takes_the_quick_path() -> None:
    # The property above holds trivially if nothing is taken: the usual reads are.
    data = (
        b"GET /vmms/x/state HTTP/1.1\r\nhost: a\r\naccept: */*\r\nauthorization: Bearer t\r\n\r\n"
    )
    assert simple_get_target(data, MAX_HEAD) == b"/vmms/x/state"
    assert simple_get_target(data, len(data) - 1) is None  # over the head bound: h11's


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (b"Host: b\r\n", "Found multiple Host: headers"),
        (b"x-a: b\r\n c\r\n", None),  # obs-fold: h11 joins it; the router answers
    ],
)
async def test_a_state_read_h11_would_refuse_is_refused_as_on_every_route(
    extra: bytes, message: str | None
) -> None:
    with trio.fail_after(30):
        async with serving_the_api() as (server, vmm):
            state = f"GET /vmms/{vmm}/state HTTP/1.1\r\nHost: a\r\n".encode() + extra + b"\r\n"
            other = b"GET /zones HTTP/1.1\r\nHost: a\r\n" + extra + b"\r\n"
            answers = []
            for data in (state, other):
                raw = await server.connect()
                await raw.send(data)
                answers.append(await raw.answer())
            quick, routed = answers
            if message is None:  # not the quick path's shape: answered by the router
                assert (quick.status, routed.status) == (200, 200)
            else:  # the same refusal as any other route
                assert (quick.status, routed.status) == (400, 400)
                assert quick.error()["message"] == f"malformed request: {message}"
                assert routed.error()["message"] == quick.error()["message"]
            await server.assert_serves_a_fresh_connection("/openapi.json")
    assert uuid.UUID(str(vmm))
