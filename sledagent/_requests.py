"""What a runner is given, is asked, and asks Propolis.

``RunnerContext`` is what every runner shares; ``Adoption`` what a restart hands a
re-adopted one. ``PutState``/``ReadState`` travel on a runner's queue with a one-shot
``Reply``; ``caller_error`` is what a caller is answered when Propolis did not comply;
``ensure_request`` builds the body of Propolis's ``PUT /instance`` for a new VM or a
migration target. ``OneShotTimer`` runs the runner's deadlines (the stop grace, the
migration source deadline) in its nursery.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import attrs
import trio

from ._config import AgentConfig
from ._errors import (
    AgentError,
    PeerError,
    PropolisGone,
    PropolisRefused,
    Terminating,
    Unavailable,
    bounded,
)
from ._host import PropolisConnector, Zone, ZoneBackend
from ._inline import InlineTeardown
from ._journal import JournaledVmm
from ._nics import NicReservations
from ._notifier import NexusNotifier
from ._reaper import Reaper
from ._wire import (
    InstanceEnsureBody,
    InstanceEnsureRequest,
    InstanceProperties,
    PropolisInstanceMetadata,
    SledVmmState,
    VmmStateRequested,
)

T = TypeVar("T")


class Reply(Generic[T]):
    """A one-shot answer from the runner to a waiting caller."""

    def __init__(self) -> None:
        self._done = trio.Event()
        self._value: T | None = None
        self._error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def ok(self, value: T) -> None:
        if not self.done:
            self._value = value
            self._done.set()

    def fail(self, error: BaseException) -> None:
        if not self.done:
            self._error = error
            self._done.set()

    async def wait(self) -> T:
        await self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]


@attrs.frozen
class PutState:
    requested: VmmStateRequested
    reply: Reply[SledVmmState] = attrs.field(factory=Reply)


@attrs.frozen
class ReadState:
    """Only used by the inline baseline, where reads queue behind the runner."""

    reply: Reply[SledVmmState] = attrs.field(factory=Reply)


Request = PutState | ReadState


@attrs.frozen
class Adoption:
    """A VMM taken back after an agent restart: what the journal holds of it, and its
    zone as found on the host (``None``: no zone)."""

    vmm: JournaledVmm
    zone: Zone | None


@attrs.frozen
class RunnerContext:
    """What every runner shares; built once by the agent."""

    config: AgentConfig
    backend: ZoneBackend
    connector: PropolisConnector
    notifier: NexusNotifier
    reaper: Reaper
    nics: NicReservations
    sled_id: uuid.UUID
    inline: InlineTeardown | None = None
    #: Re-adoptions asking their Propolis at once (32), after a restart (``_readopt``).
    readopt_limiter: trio.CapacityLimiter = attrs.field(factory=lambda: trio.CapacityLimiter(32))


def caller_error(exc: PeerError, propolis_id: uuid.UUID, *, seen_live: bool) -> AgentError:
    """What the caller (Nexus) is answered when Propolis did not do what was asked (the
    table in docs/design.md, "Propolis errors"); ``seen_live``: the VM had been seen, so
    its ``NoInstance`` means it is gone (the runner fails the VMM)."""
    if isinstance(exc, PropolisGone) and seen_live:
        return Terminating(propolis_id, "has failed: Propolis no longer has its VM")
    if isinstance(exc, PropolisGone):
        # Propolis answers NoInstance while it is still creating the VM.
        return Unavailable(f"Propolis has no VM yet (still initializing?); retry: {exc}")
    if exc.status is not None and 400 <= exc.status < 500 and not exc.transient:
        # Propolis's status (omicron passes it on), our code: Propolis's own code is only
        # quoted (Nexus reads NO_SUCH_INSTANCE as "gone", which Propolis cannot say here).
        said = exc.peer_message if exc.peer_message is not None else str(exc)
        code = f" {exc.code}" if exc.code is not None else ""
        return PropolisRefused(
            bounded(f"Propolis refused the request ({exc.status}{code}): {said}"),
            status=exc.status,
        )
    return Unavailable(bounded(f"Propolis request failed: {exc}"))


def ensure_request(
    body: InstanceEnsureBody, sled_id: uuid.UUID, init: dict[str, Any]
) -> InstanceEnsureRequest:
    """Propolis's ``PUT /instance`` for this registration; ``init`` is ``Spec`` or
    ``MigrationTarget`` (``_migration``)."""
    return InstanceEnsureRequest(
        init=init,
        properties=InstanceProperties(
            description="",
            id=body.instance_id,
            name=body.local_config.hostname,
            metadata=PropolisInstanceMetadata(
                project_id=body.metadata.project_id,
                silo_id=body.metadata.silo_id,
                sled_id=sled_id,
                sled_model="sledagent",
                sled_revision=0,
                sled_serial=str(sled_id),
            ),
        ),
    )


class OneShotTimer:
    """Calls ``fire`` once after a delay, unless cancelled first. Started at most once:
    a later ``start`` does not reset the clock (a repeated stop keeps the first grace)."""

    def __init__(self) -> None:
        self._scope = trio.CancelScope()
        self.started = False

    def start(self, nursery: trio.Nursery, delay_s: float, fire: Callable[[], None]) -> None:
        if self.started:
            return
        self.started = True

        async def run() -> None:
            with self._scope:
                await trio.sleep(max(0.0, delay_s))
                fire()

        nursery.start_soon(run)

    def cancel(self) -> None:
        self._scope.cancel()
