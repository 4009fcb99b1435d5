"""``sledagent zone-bundle`` against an agent that answers badly, and outputs that are
not plain files: each failure is one line and exit status 1, special files are written
into (not replaced), and no temporary file outlives the command."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from sledagent._failures import underlying_reason

from .test_zone_bundle_verbs import CLI, zb

BUNDLE_ID = str(uuid.UUID(int=7))
GOOD_BUNDLE = b"\x1f\x8b" + bytes(range(256)) * 40


def _http(body: bytes, *, announced: int | None = None, ctype: str = "application/json") -> bytes:
    length = len(body) if announced is None else announced
    head = f"HTTP/1.1 200 OK\r\ncontent-type: {ctype}\r\ncontent-length: {length}\r\n\r\n"
    return head.encode() + body


@asynccontextmanager
async def canned_agent(answer: bytes, *, then_stall: bool = False) -> AsyncIterator[str]:
    """A peer that reads a request, writes ``answer`` and closes (or stalls)."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def handle(stream: trio.SocketStream) -> None:
        got = b""
        while b"\r\n\r\n" not in got:
            chunk = await stream.receive_some()
            if not chunk:
                return
            got += chunk
        await stream.send_all(answer)
        if then_stall:
            await trio.sleep_forever()
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, handle, listeners)
        yield f"http://127.0.0.1:{port}"
        nursery.cancel_scope.cancel()


MALFORMED = [
    (b'[{"id":', "Input data was truncated"),
    (b'{"a": [1,2]}', "Expected `array`, got `object`"),
    (GOOD_BUNDLE, "JSON is malformed: invalid character (byte 0)"),
    (b'[{"id": 3}]', "Expected `object`, got `int` - at `$[0].id`"),
]


@pytest.mark.parametrize(("body", "why"), MALFORMED, ids=["cut", "object", "gzip", "shape"])
async def test_a_malformed_answer_is_one_line_naming_the_request(
    body: bytes, why: str, tmp_path: Path
) -> None:
    with trio.fail_after(60):
        async with canned_agent(_http(body)) as url:
            ran = await zb("--url", url, "ls", cwd=tmp_path)
    assert (ran.status, ran.out) == (1, "")
    assert ran.err == f"sledagent: the agent's answer to GET /zones/bundles was malformed: {why}\n"


async def test_an_answer_cut_short_names_the_bytes_received(tmp_path: Path) -> None:
    answer = _http(b"[" + b" " * 499, announced=1000)
    gz = _http(GOOD_BUNDLE[:500], announced=1000, ctype="application/gzip")
    with trio.fail_after(60):
        async with canned_agent(answer) as url:
            ls = await zb("--url", url, "ls", cwd=tmp_path)
        async with canned_agent(gz) as url:
            get = await zb("--url", url, "get", "z", "--bundle-id", BUNDLE_ID, cwd=tmp_path)
    assert (ls.status, ls.err) == (
        1,
        "sledagent: the agent's answer to GET /zones/bundles was malformed: "
        "it ended after 500 of 1000 bytes\n",
    )
    assert (get.status, get.err) == (
        1,
        f"sledagent: the agent's answer to GET /zones/bundles/z/{BUNDLE_ID} was malformed: "
        "it ended after 500 of 1000 bytes\n",
    )
    assert list(tmp_path.iterdir()) == []


async def test_get_writes_into_a_fifo_and_leaves_it_a_fifo(tmp_path: Path) -> None:
    fifo = tmp_path / "p"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()))
    reader.start()
    try:
        with trio.fail_after(60):
            async with canned_agent(_http(GOOD_BUNDLE, ctype="application/gzip")) as url:
                ran = await zb("--url", url, "get", "z", "--bundle-id", BUNDLE_ID,
                               "--output", str(fifo), cwd=tmp_path)  # fmt: skip
    finally:
        if reader.is_alive():  # the CLI never opened it: unblock the reader
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        reader.join()
    assert ran.status == 0, ran.err
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    assert received == [GOOD_BUNDLE]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]


async def test_a_write_error_on_a_device_is_one_line_and_the_device_stays(
    tmp_path: Path,
) -> None:
    with trio.fail_after(60):
        async with canned_agent(_http(GOOD_BUNDLE, ctype="application/gzip")) as url:
            ran = await zb("--url", url, "get", "z", "--bundle-id", BUNDLE_ID,
                           "--output", "/dev/full", cwd=tmp_path)  # fmt: skip
    assert (ran.status, ran.err) == (
        1,
        "sledagent: cannot write /dev/full: no space left on device\n",
    )
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)


async def test_a_stdout_write_error_is_one_line_and_exit_status_1(tmp_path: Path) -> None:
    listing = b'["oxz_a", "oxz_b"]'
    with trio.fail_after(60):
        async with canned_agent(_http(listing)) as url:
            with open("/dev/full", "wb") as full:
                r = await trio.run_process([*CLI, "--url", url, "list-zones"], stdout=full,
                                           capture_stderr=True, check=False, cwd=tmp_path)  # fmt: skip
        with open("/dev/full", "wb") as full:
            h = await trio.run_process([*CLI, "--help"], stdout=full, capture_stderr=True,
                                       check=False, cwd=tmp_path)  # fmt: skip
    assert (r.returncode, r.stderr) == (
        1,
        b"sledagent: cannot write stdout: no space left on device\n",
    )
    assert (h.returncode, h.stderr) == (
        1,
        b"sledagent: cannot write stdout: no space left on device\n",
    )


async def test_ctrl_c_during_get_leaves_no_temporary_file(tmp_path: Path) -> None:
    stalled = _http(GOOD_BUNDLE[:10], announced=1000, ctype="application/gzip")
    with trio.fail_after(60):
        async with canned_agent(stalled, then_stall=True) as url:
            proc = await trio.lowlevel.open_process(
                [*CLI, "--url", url, "get", "z", "--bundle-id", BUNDLE_ID,
                 "--output", str(tmp_path / "stall.tgz")],
                cwd=tmp_path, stderr=subprocess.PIPE,
            )  # fmt: skip
            while not list(tmp_path.iterdir()):  # noqa: ASYNC110 (another process's file)
                await trio.sleep(0.01)
            proc.send_signal(signal.SIGINT)
            status = await proc.wait()
            assert proc.stderr is not None
            await proc.stderr.aclose()
    assert status == 128 + signal.SIGINT
    assert list(tmp_path.iterdir()) == []


def test_a_name_that_does_not_resolve_is_said_so() -> None:
    no_name = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    outer = OSError("all attempts failed")
    outer.__cause__ = no_name
    assert underlying_reason(outer, host="not-a-host") == "name not-a-host does not resolve"
    again = socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
    assert underlying_reason(again, host="h") == (
        "name h cannot be resolved: temporary failure in name resolution"
    )


async def test_url_and_host_together_are_refused(tmp_path: Path) -> None:
    ran = await zb("--url", "http://127.0.0.1:1", "--host", "::1", "ls", cwd=tmp_path)
    assert (ran.status, ran.err) == (
        2,
        "sledagent: --url names the agent: give it or --host/--port, not both\n",
    )


async def test_priority_takes_a_comma_list_or_the_flag_repeated_as_omicron(
    tmp_path: Path,
) -> None:
    extra = await zb("set-context", "--priority", "time", "cause", cwd=tmp_path)
    empty = await zb("set-context", "--empty-priority", cwd=tmp_path)
    assert (extra.status, extra.err) == (
        2,
        "sledagent: unexpected argument: 'cause' (see --help)\n",
    )
    assert (empty.status, empty.err) == (
        2,
        "sledagent: Unknown option: --empty-priority. Did you mean --priority? (see --help)\n",
    )


if sys.platform != "linux":  # /dev/full
    pytestmark = pytest.mark.skip("Linux devices")


async def test_log_lines_in_a_file_have_no_colour_codes(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with canned_agent(_http(b"[]")) as url:
            ran = await zb("--url", url, "--log-level", "debug", "ls", cwd=tmp_path)
    assert ran.status == 0 and "agent_answered" in ran.err
    assert "\x1b[" not in ran.err


def test_colour_only_on_a_terminal_without_no_color(monkeypatch: pytest.MonkeyPatch) -> None:
    from sledagent._log import wants_colour

    main, other = os.openpty()
    with os.fdopen(main, "w") as tty, open(os.devnull, "w") as file:
        monkeypatch.delenv("NO_COLOR", raising=False)
        assert (wants_colour(tty), wants_colour(file)) == (True, False)
        monkeypatch.setenv("NO_COLOR", "1")
        assert wants_colour(tty) is False
    os.close(other)
