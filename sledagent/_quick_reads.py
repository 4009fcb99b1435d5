"""The quick path's answers to ``GET /vmms/{propolis_id}/state`` (issue 21), as whole bytes.

One function builds them for both servers that answer state reads: the agent's own
(``_api.build_app``: from the registry) and the front process (``_front_main``: from its
replica of the registry's answers). Both give the same answers, headers, refusals and
log lines as the router's ``vmm_get_state``: a 200 with the VMM's newest *journaled*
``SledVmmState``, a 404 ``NO_SUCH_INSTANCE`` for a VMM that is not registered, a 503
``OVERLOADED`` with ``Retry-After`` when the read admission sheds it. Anything else (a
bad or missing token, a target the router must judge, a VMM whose state is not journaled
yet) is ``None``: the router answers it, on the agent's loop.

Kept apart from ``_api`` (Starlette, the agent) so that the front process imports only
this, the wire models and the admission.
"""

from __future__ import annotations

import hmac
import random
import re
import uuid
from collections.abc import Awaitable, Callable

import structlog

from ._admission import ReadAdmission
from ._codec import encode
from ._errors import AgentError, NoSuchVmm, Overloaded
from ._quick_shape import simple_get_target
from ._wire import Error

log = structlog.get_logger("sledagent.api")

#: ``await quick_get(target, head) -> whole answer bytes | None`` (``_http.QuickGet``).
QuickGet = Callable[[bytes, bytes], Awaitable["bytes | None"]]

#: ``GET /vmms/{propolis_id}/state`` as the quick path sees it (a UUID in its usual forms;
#: anything else, percent-encoded or with a query, goes through the router).
STATE_TARGET = re.compile(rb"/vmms/([0-9A-Fa-f-]{32,36})/state")
_BEARER = re.compile(rb"(?:^|\n)authorization:[ \t]*([!-~ \t]*?)[ \t]*\r\n", re.I)

_ids = random.Random()
#: ``StateReads.answer_now`` keeps what this many distinct requests of up to
#: ``_SEEN_BYTES`` each mean (one per poller's connection, in practice); then starts over.
_SEEN_MAX = 4096
_SEEN_BYTES = 1024


def request_id() -> str:
    """A random (version 4) UUID, as dropshot's; drawn without a syscall per request,
    and formatted without building a ``uuid.UUID`` (a third of the cost)."""
    h = "%032x" % (_ids.getrandbits(128) & _V4_CLEAR | _V4_SET)
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


# RFC 9562 4.1, 5.4: version 4 in bits 48-51 and the variant 10 in bits 64-65.
_V4_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))
_V4_SET = (0x4000 << 64) | (0x8000 << 48)


def bearer_matches(value: bytes, token: bytes) -> bool:
    """Whether an ``Authorization`` value carries ``token`` in the Bearer scheme, compared
    in constant time. The scheme is case-insensitive (RFC 9110 11.1: ``bearer`` and
    ``BEARER`` are ``Bearer``); one or more spaces separate it from the credentials
    (RFC 9110 11.4)."""
    scheme, _, credentials = value.partition(b" ")
    return hmac.compare_digest(credentials.lstrip(b" "), token) and scheme.lower() == b"bearer"


def whole_answer(status: int, body: bytes, request_id: str, extra: bytes = b"") -> bytes:
    """A whole keep-alive answer, as h11 writes Starlette's (no reason phrase)."""
    return b"HTTP/1.1 %d \r\ncontent-length: %d\r\ncontent-type: application/json\r\n%sx-request-id: %s\r\n\r\n%s" % (  # noqa: E501
        status, len(body), extra, request_id.encode(), body
    )  # fmt: skip


def refused_read(reason: str, retry_after_s: int) -> Overloaded:
    """The error of a state read the admission shed (503 ``OVERLOADED``)."""
    return Overloaded(
        f"the agent is overloaded ({reason.replace('_', ' ')}): state read refused; "
        f"retry in {retry_after_s} s",
        retry_after_s=retry_after_s,
    )


class StateReads:
    """The quick path for state reads over ``answer(propolis_id)`` (the encoded journaled
    ``SledVmmState``; None: none yet) and ``known(propolis_id)`` (registered here).
    ``token``: every read must carry ``Authorization: Bearer <token>`` (else the router
    answers its 401). ``debug_requests``: log each answer (``api_request``).

    ``await reads(target, head)`` is a ``QuickGet`` (the admission may make the read wait
    for its turn: the agent's loop); ``reads.answer_now(request, max_head_bytes)``
    judges the request's shape too and decides at once, without turns
    (``ReadAdmission.decide``: the front process's loop, which only reads)."""

    def __init__(
        self,
        answer: Callable[[uuid.UUID], bytes | None],
        known: Callable[[uuid.UUID], bool],
        admission: ReadAdmission,
        *,
        token: bytes | None = None,
        debug_requests: bool = False,
    ) -> None:
        self.answer, self.known, self.admission = answer, known, admission
        self.token, self.debug_requests = token, debug_requests
        #: ``answer_now``'s requests already judged: bytes -> (target, propolis_id).
        self._seen: dict[bytes, tuple[bytes, uuid.UUID]] = {}

    async def __call__(self, target: bytes, head: bytes) -> bytes | None:
        propolis_id = self.target_id(target, head)
        if propolis_id is None:
            return None
        return self.reply(propolis_id, target, await self.admission.admit())

    def answer_now(self, request: bytes, max_head_bytes: int) -> bytes | None:
        """The whole answer to ``request`` (a connection's bytes after an idle wait) if it
        is exactly one quick read (``simple_get_target``), decided at once; None: the
        agent's router must answer it.

        A poller sends the same bytes every time (target, host, token): what those bytes
        mean (shape, token, id: about two thirds of the Python a read costs) is kept for
        up to ``_SEEN_MAX`` distinct requests; the decision and the answer never are."""
        seen = self._seen.get(request)
        if seen is None:
            target = simple_get_target(request, max_head_bytes)
            propolis_id = None if target is None else self.target_id(target, request)
            if target is None or propolis_id is None:
                return None
            seen = (target, propolis_id)
            if len(request) <= _SEEN_BYTES:
                if len(self._seen) >= _SEEN_MAX:
                    self._seen.clear()
                self._seen[request] = seen
        return self.reply(seen[1], seen[0], self.admission.decide())

    def target_id(self, target: bytes, head: bytes) -> uuid.UUID | None:
        """The VMM a quick read is for; None: the router must answer it."""
        match = STATE_TARGET.fullmatch(target)
        if match is None:
            return None
        if self.token is not None:
            bearer = _BEARER.search(head)
            if bearer is None or not bearer_matches(bearer[1], self.token):
                return None  # the router answers 401
        try:
            return uuid.UUID(match[1].decode())
        except ValueError:
            return None  # the router answers 400 naming the parameter

    def reply(self, propolis_id: uuid.UUID, target: bytes, refused: str | None) -> bytes | None:
        """The whole answer to a read for ``propolis_id``, refused for the admission's
        reason ``refused`` (None: served); None: the router must answer it."""
        rid = request_id()
        if refused is not None:  # counted and logged per burst by the admission
            admission = self.admission
            exc: AgentError = refused_read(refused, admission.retry_after_s)
            body = encode(Error(message=exc.message, request_id=rid, error_code=exc.error_code))
            return whole_answer(503, body, rid, b"retry-after: %d\r\n" % admission.retry_after_s)
        state = self.answer(propolis_id)
        if state is not None:
            if self.debug_requests:
                log.debug("api_request", request_id=rid, method="GET",
                          path=target.decode(), status=200)  # fmt: skip
            return whole_answer(200, state, rid)
        if self.known(propolis_id):
            return None  # registered, its state not on disk yet: the router waits for it
        exc = NoSuchVmm(propolis_id)
        log.info(
            "api_refused",
            request_id=rid,
            method="GET",
            path=target.decode(),
            status=exc.status,
            error_code=exc.error_code,
            message=exc.message,
        )
        body = encode(Error(message=exc.message, request_id=rid, error_code=exc.error_code))
        return whole_answer(exc.status, body, rid)


def state_reads(
    answer: Callable[[uuid.UUID], bytes | None],
    known: Callable[[uuid.UUID], bool],
    admission: ReadAdmission,
    *,
    token: bytes | None = None,
    debug_requests: bool = False,
) -> StateReads:
    """``StateReads``: the quick path for state reads (a ``QuickGet``)."""
    return StateReads(answer, known, admission, token=token, debug_requests=debug_requests)
