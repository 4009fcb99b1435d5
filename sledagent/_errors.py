"""The agent's error types, each with the HTTP status and ``error_code`` it maps to.

Codes and statuses are omicron's where omicron has one (``NO_SUCH_INSTANCE`` as 404 for
an unknown VMM and 410 for one that is terminating; ``INSTANCE_CHANNEL_FULL``... as a
503). The API layer turns any ``AgentError`` into ``{message, error_code, request_id}``.
"""

from __future__ import annotations

import uuid


class AgentError(Exception):
    """Base of every error a caller of the agent can see."""

    status: int = 500
    error_code: str | None = "INTERNAL"

    @property
    def message(self) -> str:
        return str(self)


class BadRequest(AgentError, ValueError):
    """Malformed or invalid input; the message names the failing field."""

    status = 400
    error_code = "INVALID_REQUEST"


class NoSuchVmm(AgentError, LookupError):
    """No VMM with this id is registered on this sled (404 ``NO_SUCH_INSTANCE``)."""

    status = 404
    error_code = "NO_SUCH_INSTANCE"

    def __init__(self, propolis_id: uuid.UUID) -> None:
        super().__init__(f"no such VMM: {propolis_id}")
        self.propolis_id = propolis_id


class Terminating(AgentError):
    """The VMM has halted; it takes no more state changes (410 ``NO_SUCH_INSTANCE``).

    Also the answer to a state change that found Propolis without the VM it had run
    (``NoInstance``): the VMM has failed at once (omicron #6726)."""

    status = 410
    error_code = "NO_SUCH_INSTANCE"

    def __init__(self, propolis_id: uuid.UUID, why: str = "is terminating") -> None:
        super().__init__(f"VMM {propolis_id} {why}")
        self.propolis_id = propolis_id


class ChannelFull(AgentError):
    """The VMM's runner queue is full; retry later (503 ``INSTANCE_CHANNEL_FULL``)."""

    status = 503
    error_code = "INSTANCE_CHANNEL_FULL"

    def __init__(self, propolis_id: uuid.UUID, capacity: int) -> None:
        super().__init__(
            f"failed to send request to VMM {propolis_id}: channel at capacity ({capacity})"
        )
        self.propolis_id = propolis_id


class NoSuchZone(AgentError, LookupError):
    """No live VMM zone by this name on this sled (404)."""

    status = 404
    error_code = "NO_SUCH_ZONE"


class NoSuchBundleJob(AgentError, LookupError):
    """No bundle job with this id (404)."""

    status = 404
    error_code = "NO_SUCH_BUNDLE_JOB"


class PropolisAlreadyRegistered(AgentError):
    """The propolis id is registered for a different instance (409)."""

    status = 409
    error_code = "PROPOLIS_ALREADY_REGISTERED"


class VmNotRunning(AgentError):
    """The request needs a running VMM and there is none yet (409)."""

    status = 409
    error_code = "VM_NOT_RUNNING"

    def __init__(self, propolis_id: uuid.UUID) -> None:
        super().__init__(f"VMM {propolis_id} is registered but not running")
        self.propolis_id = propolis_id


class GenerationExhausted(AgentError):
    """A generation would pass the u64 maximum of the contracts (409); never sent."""

    status = 409
    error_code = "GENERATION_EXHAUSTED"


class Unavailable(AgentError):
    """A resource the request needs is busy or the host is full; retry later (503)."""

    status = 503
    error_code = "SERVICE_UNAVAILABLE"


class Overloaded(Unavailable):
    """Refused at once because the agent is overloaded (``_admission``): publishing halts
    comes first, or the request waited past its bound. Answered with ``Retry-After``."""

    error_code = "OVERLOADED"

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NicsStillHeld(Unavailable):
    """A previous incarnation's zone still holds NICs this VMM needs (503)."""

    error_code = "NIC_IN_USE"


class HostFull(Unavailable):
    """The sled already holds its configured maximum of zones (503)."""

    error_code = "INSUFFICIENT_CAPACITY"


class ShuttingDown(Unavailable):
    """The agent is stopping and accepts no new work (503)."""

    error_code = "SHUTTING_DOWN"


class PropolisRefused(AgentError):
    """Propolis refused a state change for good: its 4xx status (as omicron's sled-agent
    passes it on), our own ``PROPOLIS_REFUSED``, Propolis's code and message quoted,
    bounded, in ``message``.

    Nexus retries a 503 and takes a 4xx as final; a permanent refusal reported as 503
    would be retried forever (omicron #3238, #3334). The code is never Propolis's: Nexus
    reads ``NO_SUCH_INSTANCE`` as "the VMM is gone" (RFD 486), which only the agent's own
    knowledge may say."""

    error_code = "PROPOLIS_REFUSED"

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status


# --- HTTP-level refusals of the API -------------------------------------------------


class PayloadTooLarge(AgentError):
    status = 413
    error_code = "PAYLOAD_TOO_LARGE"


class UnsupportedMediaType(AgentError):
    status = 415
    error_code = "UNSUPPORTED_MEDIA_TYPE"


class Unauthorized(AgentError):
    status = 401
    error_code = "UNAUTHORIZED"


class NotFound(AgentError):
    status = 404
    error_code = "NOT_FOUND"


# --- errors from the peers the agent drives (never shown to callers as such) ---------

#: The most characters of a peer's text (an error message, an error code) the agent
#: quotes in its own answers and logs: a peer's 2 MB message must not become a 2 MB
#: answer or log line.
PEER_TEXT_MAX = 1024


def bounded(text: str, limit: int = PEER_TEXT_MAX) -> str:
    """``text`` cut to ``limit`` characters, saying how much was left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


class PeerError(Exception):
    """A request to Propolis or Nexus failed."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        peer_message: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.code = code
        #: The ``message`` of the peer's error body, when it sent one.
        self.peer_message = peer_message

    @property
    def transient(self) -> bool:
        """Worth retrying: no answer at all, a 5xx, or 408/429 (the peer asks for later)."""
        return self.status is None or self.status >= 500 or self.status in (408, 429)


class PropolisGone(PeerError):
    """Propolis answers but has no VM (410 or ``NoInstance``), or its process is gone."""


class MalformedAnswer(PeerError):
    """A peer answered with a success status but a body that is not the contract's (not
    JSON, a missing field, a state it does not define, a generation outside u64). A
    fault of that peer, treated like one that does not answer: retried with backoff, and
    for a Propolis the VMM fails after ``propolis_unreachable_s`` (never the daemon)."""

    @property
    def transient(self) -> bool:
        return True
