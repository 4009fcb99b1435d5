"""The ASGI ``receive``/``send`` of one request on a connection (``_http``): the body
read through h11 under its limits (408 on a stall, 413 past the cap, 400 for a bad
chunk), ``100 Continue`` when the client waits for it, and a response of known length
written in one ``send_all``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import h11
import trio

from ._http_common import STATS, Message

if TYPE_CHECKING:
    from ._http import _Connection

DISCONNECT: Message = {"type": "http.disconnect"}


class Exchange:
    """ASGI ``receive``/``send`` for one request on a connection."""

    def __init__(self, conn: _Connection, head_only: bool) -> None:
        self.conn = conn
        self.head_only = head_only
        self.started = self.finished = self.aborted = False
        self.head: h11.Response | None = None
        self.head_sent = self.body_done = False
        self.received = 0
        self.done = trio.Event()

    async def _abort(self, status: int, message: str, *, linger: bool = True) -> Message:
        """The server ends the request (bad body, too slow, too big): it answers if the
        app has not, and the app sees the client leave."""
        if not self.started:
            await self.conn.refuse(status, message, linger=linger)
        self.aborted = self.body_done = self.started = self.finished = True
        return DISCONNECT

    async def receive(self) -> Message:
        conn = self.conn
        if self.body_done:
            # ASGI: once the body is read, receive() waits for the end of the exchange
            # (apps that stream a response listen for the client leaving this way).
            await self.done.wait()
            return DISCONNECT
        if conn.h11.their_state is not h11.SEND_BODY:
            self.body_done = True
            return {"type": "http.request", "body": b"", "more_body": False}
        limits = conn.limits
        try:
            if conn.h11.they_are_waiting_for_100_continue:
                await conn.stream.send_all(
                    conn.h11.send(h11.InformationalResponse(status_code=100, headers=[])) or b""
                )
            with trio.move_on_after(limits.body_timeout_s) as stalled:
                event = await conn.read_event()
        except h11.RemoteProtocolError as exc:
            if not conn.peer_left:  # bad chunk, more than declared: the client's error
                return await self._abort(400, f"malformed request body: {exc}")
            STATS.left("body")  # closed mid-body: it left, nothing to answer
            self.aborted = self.body_done = self.started = self.finished = True
            return DISCONNECT
        except (trio.BrokenResourceError, trio.ClosedResourceError):  # reset mid-body
            STATS.left("body")
            self.aborted = self.body_done = self.started = self.finished = True
            return DISCONNECT
        if stalled.cancelled_caught:
            return await self._abort(408, "request body not received in time", linger=False)
        if isinstance(event, h11.Data):
            self.received += len(event.data)
            if self.received > limits.max_body_bytes:
                return await self._abort(413, f"request body over {limits.max_body_bytes} bytes")
            return {"type": "http.request", "body": bytes(event.data), "more_body": True}
        if isinstance(event, h11.EndOfMessage):
            self.body_done = True
            return {"type": "http.request", "body": b"", "more_body": False}
        self.body_done = True
        return DISCONNECT

    async def send(self, message: Message) -> None:
        if self.aborted:
            return  # the server answered already; the app's answer goes nowhere
        conn = self.conn
        kind = message["type"]
        if kind == "http.response.start":
            if self.started:
                raise RuntimeError("response already started")
            self.started = True
            headers = list(message.get("headers", []))
            h = conn.h11
            if h.their_state is h11.SEND_BODY and (
                h.they_are_waiting_for_100_continue
                or self._unread() > conn.limits.max_discard_bytes
            ):
                # The body will not come (no 100 Continue) or is too big to drop: say so.
                headers.append((b"connection", b"close"))
            elif conn.table.retiring:  # this server hands over: the next request, elsewhere
                headers.append((b"connection", b"close"))
            self.head = h11.Response(status_code=message["status"], headers=headers)
            return
        if kind != "http.response.body" or self.head is None or self.finished:
            raise RuntimeError(f"unexpected ASGI message {kind!r}")
        out = b""
        if not self.head_sent:
            out += conn.h11.send(self.head) or b""
            self.head_sent = True
        body = message.get("body", b"")
        if body and not self.head_only:  # HEAD: the headers of GET, no body (RFC 9110 9.3.2)
            out += conn.h11.send(h11.Data(data=body)) or b""
        last = not message.get("more_body", False)
        if last:
            out += conn.h11.send(h11.EndOfMessage()) or b""
            self.finished = True
        if out:  # a response of known length goes out in one write
            await conn.stream.send_all(out)
        if last:
            # Only now: an app that streams its answer (Starlette's ``FileResponse``)
            # listens for ``http.disconnect`` and cancels its own send when it comes; set
            # before the last write, a slow reader lost up to the last chunk (64 KiB of a
            # bundle), and the connection stayed open, out of step with its client.
            self.done.set()

    def _unread(self) -> int:
        """Declared body bytes not read yet (a chunked body: 0, unknown)."""
        length = self.conn.body_length
        return 0 if length is None else length - self.received
