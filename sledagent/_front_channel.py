"""The channel between the agent and its front process (``_front_proc``, ``_front_main``).

One ``AF_UNIX``/``SOCK_SEQPACKET`` socket pair: every message arrives whole and in order
(no framing to get wrong), and can carry descriptors (``SCM_RIGHTS``): the listening
sockets one way, each handed-over connection the other. A message is one kind byte and
a payload:

- agent -> front: ``ANSWERS`` (msgpack ``[[propolis_id (16 bytes), answer], ...]``;
  ``answer`` is the encoded journaled ``SledVmmState``, ``b""`` for a VMM registered but
  not journaled yet, ``None`` for one removed), ``LISTEN`` (the listening sockets, then
  the settings as msgpack ``FrontSettings``: sent after the whole registry, so the front
  never answers from half of it), ``PUBLISHING`` (msgpack float: how far behind the
  agent's thread runs while halts are being published, seconds; 0.0: it keeps up or
  nothing is published; sent when that changes: "publication first" in the front),
  ``STOP`` (stop accepting, finish, exit);
- front -> agent: ``SERVING`` (it accepts on the sockets: the agent stops accepting
  there itself), ``HANDOVER`` (a connection, and the bytes read from it), ``STATS``
  (msgpack ``FrontStats``, cumulative, about once a second).

Both ends are non-blocking; ``send_nowait`` and ``receive_nowait`` never wait, so the
agent can publish an answer from synchronous code, and the front can catch up with
every answer already sent before it answers a read (read-your-writes: ``_front_main``).
"""

from __future__ import annotations

import socket
from collections.abc import Sequence

import attrs
import msgspec
import trio

from ._admission import ReadLimits
from ._http_common import HttpLimits

ANSWERS = b"A"
LISTEN = b"L"
STOP = b"S"
PUBLISHING = b"P"
HANDOVER = b"H"
STATS = b"T"
SERVING = b"R"

#: Largest message either side sends: a handover carries up to 64 KiB read (``_front_loop``).
MAX_MESSAGE = 128 * 1024
#: Answers are sent in messages of at most this many bytes.
ANSWERS_PER_MESSAGE_BYTES = 32 * 1024
_MAX_FDS = 16


@attrs.frozen(kw_only=True)
class FrontSettings:
    """What the front needs to serve as the agent would (sent with ``LISTEN``: the
    token never appears in a command line or the environment)."""

    limits: HttpLimits
    reads: ReadLimits
    token: str | None = None
    debug_requests: bool = False


@attrs.frozen(kw_only=True)
class FrontStats:
    """The front's counters since it started (``sledagent_reads_*``, ``sledagent_http_*``)."""

    admitted: int = 0
    shed: dict[str, int] = attrs.Factory(dict)
    #: ``ReadAdmission.waited``'s counts per bucket (the last: above every bound), and sum.
    waited_counts: list[int] = attrs.Factory(list)
    waited_sum: float = 0.0
    connections_open: int = 0
    accept_errors: dict[str, int] = attrs.Factory(dict)
    idle_closed: int = 0
    refused: dict[int, int] = attrs.Factory(dict)
    abandoned: dict[str, int] = attrs.Factory(dict)
    handed_over: int = 0


class ChannelClosed(Exception):
    """The other end is gone (it exited, or was killed)."""


class Channel:
    """One end of the socket pair (non-blocking; owns the socket)."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno()

    def send_nowait(self, kind: bytes, payload: bytes = b"", fds: Sequence[int] = ()) -> bool:
        """Send one message now; False if the socket's buffer is full (nothing sent).
        Raises ``ChannelClosed`` if the other end is gone."""
        try:
            if fds:
                socket.send_fds(self.sock, [kind, payload], list(fds))
            else:
                self.sock.send(kind + payload)
        except BlockingIOError:
            return False
        except OSError as exc:  # EPIPE, ECONNRESET: the other end exited
            raise ChannelClosed(str(exc)) from None
        return True

    async def send(self, kind: bytes, payload: bytes = b"", fds: Sequence[int] = ()) -> None:
        while not self.send_nowait(kind, payload, fds):
            await trio.lowlevel.wait_writable(self.sock)

    def receive_nowait(self) -> tuple[bytes, bytes, list[int]] | None:
        """The next message (kind, payload, descriptors), or None if none is waiting.
        Raises ``ChannelClosed`` at the end of the stream."""
        try:
            data, fds, _flags, _addr = socket.recv_fds(
                self.sock, MAX_MESSAGE, _MAX_FDS, socket.MSG_DONTWAIT
            )
        except BlockingIOError:
            return None
        except OSError as exc:
            raise ChannelClosed(str(exc)) from None
        if not data:
            for fd in fds:
                _close(fd)
            raise ChannelClosed("the other end closed the channel")
        return data[:1], data[1:], fds

    def next_kind_nowait(self) -> bytes | None:
        """The kind of the next message, left in the channel (its descriptors too); None
        if none is waiting. Raises ``ChannelClosed`` at the end of the stream."""
        try:
            kind = self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None
        except OSError as exc:
            raise ChannelClosed(str(exc)) from None
        if not kind:
            raise ChannelClosed("the other end closed the channel")
        return kind

    def receive_plain_nowait(self) -> tuple[bytes, bytes] | None:
        """``receive_nowait`` for a side that expects no more descriptors (the front,
        once it has its sockets): a plain ``recv``, about a third of ``recvmsg``'s cost
        from Python (the front calls it before every read). A descriptor sent anyway
        is closed by the kernel."""
        try:
            data = self.sock.recv(MAX_MESSAGE, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None
        except OSError as exc:
            raise ChannelClosed(str(exc)) from None
        if not data:
            raise ChannelClosed("the other end closed the channel")
        return data[:1], data[1:]

    async def receive(self) -> tuple[bytes, bytes, list[int]]:
        while (message := self.receive_nowait()) is None:
            await trio.lowlevel.wait_readable(self.sock)
        return message

    def close(self) -> None:
        self.sock.close()


def encode_answers(changes: Sequence[tuple[bytes, bytes | None]]) -> list[bytes]:
    """``changes`` as ``ANSWERS`` payloads of at most ~``ANSWERS_PER_MESSAGE_BYTES``."""
    payloads: list[bytes] = []
    batch: list[tuple[bytes, bytes | None]] = []
    size = 0
    for change in changes:
        batch.append(change)
        size += 24 + len(change[1] or b"")
        if size >= ANSWERS_PER_MESSAGE_BYTES:
            payloads.append(msgspec.msgpack.encode(batch))
            batch, size = [], 0
    if batch:
        payloads.append(msgspec.msgpack.encode(batch))
    return payloads


def decode_answers(payload: bytes) -> list[tuple[bytes, bytes | None]]:
    return msgspec.msgpack.decode(payload, type=list[tuple[bytes, bytes | None]])


def _close(fd: int) -> None:
    try:
        socket.socket(fileno=fd).close()
    except OSError:
        pass
