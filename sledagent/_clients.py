"""HTTP clients for the peers the agent drives: Propolis and Nexus (h11, on trio).

They implement the same protocols as the fakes (``PropolisClient``/``PropolisConnector``,
``NexusClient``), so the core does not change. Any 2xx is success. Errors become
``PeerError`` (status ``None`` when there was no answer at all), Propolis's "no VM here"
(410, or an error code ``NoInstance``) becomes ``PropolisGone``, and a 2xx whose body is
not the contract's becomes ``MalformedAnswer``: a peer's answer never escapes as any
other exception. A peer's error code and message are kept bounded (``PEER_TEXT_MAX``).
The state-monitor long poll has no deadline for its answer to begin: it is bounded by the
caller's cancel scope, never by a thread timeout; once begun, the answer must keep coming
(``H1Pool``'s ``read_timeout_s``), else the request fails as a transient ``PeerError``.
They speak through ``H1Pool`` rather than httpx: see
``_h1client`` for the measured reason.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from ._codec import decode, encode
from ._errors import BadRequest, MalformedAnswer, PeerError, PropolisGone, bounded
from ._h1client import ConnectionFailed, H1Pool, H1Response
from ._host import Zone
from ._wire import (
    InstanceEnsureRequest,
    InstanceGetResponse,
    InstanceStateMonitorRequest,
    InstanceStateMonitorResponse,
    InstanceStateRequested,
    SledVmmState,
)

T = TypeVar("T")

_JSON = (("content-type", "application/json"),)
_REQUEST_TIMEOUT_S = 30.0


def error_fields(response: H1Response) -> tuple[str | None, str | None]:
    """The ``error_code`` and ``message`` of an error body (dropshot's shape), if any,
    each cut to ``PEER_TEXT_MAX`` characters."""
    try:
        body = json.loads(response.body)
    except ValueError:
        return None, None
    if not isinstance(body, dict):
        return None, None
    code, message = body.get("error_code"), body.get("message")
    return (
        bounded(code) if isinstance(code, str) else None,
        bounded(message) if isinstance(message, str) else None,
    )


def _answer(response: H1Response, what: str, tp: type[T]) -> T:
    """The body of a successful answer as ``tp``; ``MalformedAnswer`` if it is not one."""
    try:
        return decode(response.body, tp)
    except BadRequest as exc:
        raise MalformedAnswer(
            bounded(f"{what}: {response.status} with a malformed body: {exc}"),
            status=response.status,
        ) from None


async def _send(
    pool: H1Pool,
    method: str,
    target: str,
    body: bytes,
    *,
    timeout_s: float | None,
    gone_on_410: bool = False,
    parse_gate: trio.CapacityLimiter | None = None,
) -> H1Response:
    try:
        response = await pool.request(
            method, target, body, headers=_JSON, timeout_s=timeout_s, parse_gate=parse_gate
        )
    except ConnectionFailed as exc:  # refused, reset, timed out: no answer (it names the request)
        raise PeerError(str(exc)) from exc
    if 200 <= response.status < 300:  # whatever 2xx the peer chose: it did it
        return response
    code, peer_message = error_fields(response)
    text = response.body[:200].decode("utf-8", "replace")
    message = f"{method} {pool.base_url}{target}: {response.status} {text}"
    if gone_on_410 and (response.status == 410 or code == "NoInstance"):
        raise PropolisGone(message, status=response.status, code=code, peer_message=peer_message)
    raise PeerError(message, status=response.status, code=code, peer_message=peer_message)


class HttpPropolisClient:
    """Drives the Propolis that ``pool`` reaches (``http://<propolis_addr>``).

    ``answer_gate``: shared by every Propolis's client; state-monitor answers are parsed
    holding one of its tokens (``H1Pool.request``'s ``parse_gate``)."""

    def __init__(self, pool: H1Pool, answer_gate: trio.CapacityLimiter | None = None) -> None:
        self._pool = pool
        self._answer_gate = answer_gate

    async def ensure(self, request: InstanceEnsureRequest) -> None:
        await _send(
            self._pool, "PUT", "/instance", encode(request),
            timeout_s=_REQUEST_TIMEOUT_S,
        )  # fmt: skip

    async def instance(self) -> InstanceGetResponse:
        response = await _send(
            self._pool, "GET", "/instance", b"",
            timeout_s=_REQUEST_TIMEOUT_S, gone_on_410=True,
        )  # fmt: skip
        return _answer(response, f"GET {self._pool.base_url}/instance", InstanceGetResponse)

    async def put_state(self, requested: InstanceStateRequested) -> None:
        await _send(
            self._pool, "PUT", "/instance/state", encode(requested),
            timeout_s=_REQUEST_TIMEOUT_S, gone_on_410=True,
        )  # fmt: skip

    async def state_monitor(self, gen: int) -> InstanceStateMonitorResponse:
        """Propolis's first state at generation ``gen`` or later (``gen``: a u64; the
        monitor never asks past 2^64 - 1)."""
        response = await _send(
            self._pool, "GET", "/instance/state-monitor",
            encode(InstanceStateMonitorRequest(gen)),
            timeout_s=None, gone_on_410=True, parse_gate=self._answer_gate,
        )  # fmt: skip
        what = f"GET {self._pool.base_url}/instance/state-monitor"
        return _answer(response, what, InstanceStateMonitorResponse)


class HttpPropolisConnector:
    """One small connection pool per Propolis.

    A single pool shared by every Propolis made httpx's pool scan all of its connections
    (each VMM holds one in a long poll) on every request: measured at 20 VMMs, 350k
    ``is_idle`` calls in one mass stop. Each zone's pool is closed when the zone is
    forgotten; closing only drops idle sockets, so it never blocks a runner.

    Every monitor's answer is parsed (and then handled by its runner, in the same
    scheduling step) holding one of ``answers_at_once`` tokens. When every guest halts
    at once, a thousand long polls are answered within a few milliseconds; trio runs
    every task made runnable in one batch, so without the gate one batch parsed and
    handled them all while API reads waited behind it (the event loop stalled 100-260
    ms at N=1000). With it, a batch handles a few: reads interleave. Measured, N=1000
    floor, 400 reads/s: GET p99 270-294 ms -> 21-27 ms with 8 tokens, 54 ms with 32;
    halt-to-publish unchanged within noise (docs/performance.md, "Session 6").
    """

    def __init__(self, *, answers_at_once: int = 8) -> None:
        self._pools: dict[str, H1Pool] = {}
        self._answer_gate = trio.CapacityLimiter(answers_at_once)
        #: Pools of defunct zones, closed together once publishing has settled.
        self._retired: list[H1Pool] = []
        self._retiring = trio.Event()
        #: What closing retired pools waits for first (the agent sets it to "no delivery
        #: to Nexus under way"): closing sockets is work the halts' publication need not
        #: wait behind.
        self.close_after: Callable[[], Awaitable[None]] | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            task_status.started()
            while True:
                await self._retiring.wait()
                if self.close_after is not None:
                    await self.close_after()
                self._retiring = trio.Event()
                retired, self._retired = self._retired, []
                for pool in retired:
                    pool.close_idle_now()
        finally:
            for pool in [*self._pools.values(), *self._retired]:
                pool.close_idle_now()
            self._pools.clear()
            self._retired.clear()

    @property
    def answers_waiting(self) -> int:
        """Monitor answers arrived and waiting for a token to be parsed and handled."""
        return self._answer_gate.statistics().tasks_waiting

    def client_for(self, zone: Zone) -> HttpPropolisClient:
        pool = self._pools.get(zone.name)
        if pool is None:
            pool = H1Pool(f"http://{zone.propolis_addr}", max_connections=8, max_idle=4)
            self._pools[zone.name] = pool
        return HttpPropolisClient(pool, self._answer_gate)

    def forget(self, zone: Zone) -> None:
        """The zone is defunct: its pool is closed in the background, with the others
        retired meanwhile, once publishing has settled (``close_after``). Measured at
        N=1000: a task per pool closing its sockets took 16% of the agent's thread while
        the halts were being published (py-spy, docs/performance.md)."""
        pool = self._pools.pop(zone.name, None)
        if pool is not None:
            self._retired.append(pool)
            self._retiring.set()


class HttpNexusClient:
    """``PUT /vmms/{propolis_id}`` with a ``SledVmmState``; 204 is the acknowledgement.

    ``pool`` reaches Nexus (``H1Pool(nexus_url, max_connections=...)``): its bound is how
    many deliveries may be in flight at once.
    """

    def __init__(self, pool: H1Pool) -> None:
        self._pool = pool

    async def put_vmm_state(self, propolis_id: uuid.UUID, state: SledVmmState) -> None:
        await _send(
            self._pool, "PUT", f"/vmms/{propolis_id}", encode(state),
            timeout_s=_REQUEST_TIMEOUT_S,
        )  # fmt: skip
