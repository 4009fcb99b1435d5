"""A simulated Propolis on the real wire: the Propolis API over HTTP for one VM.

The state machine is ``sledagent.testing.FakePropolis`` (long-poll semantics, Run/Stop/
Reboot walks); this module is only its HTTP face. Requests are decoded strictly against
the contract models, so an agent that sends a malformed request gets a 400 and the test
that drives it fails. A small control surface of our own (``/sim/...``) lets a test or
an operator act as the guest: halt, fail, hang the state monitor, drop requests (503),
vanish, refuse the next state requests (``refuse?status=&code=&message=&times=``), or
answer the state monitor without waiting (``eager``). Live migration (the source's side
of the exchange, and its controls: hold a phase, fail one, timings, the guest's console)
is ``sim/_migrate.py``.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .._codec import decode, encode
from .._errors import BadRequest, PeerError, PropolisGone
from .._wire import (
    Error,
    InstanceEnsureRequest,
    InstanceStateMonitorRequest,
    InstanceStateRequested,
)
from ..testing._propolis import FakePropolis
from ._migrate import migration_control_routes, migration_routes


def _error(status: int, message: str, code: str | None) -> Response:
    body = Error(message=message, request_id=uuid.uuid4().hex, error_code=code)
    return Response(encode(body), status_code=status, media_type="application/json")


def sim_propolis_app(vm: FakePropolis) -> Starlette:
    """The Propolis API (``/instance``...) over ``vm``, plus ``/sim/...`` controls."""

    def handler(
        fn: Callable[[Request], Awaitable[Response]],
    ) -> Callable[[Request], Awaitable[Response]]:
        async def wrapped(request: Request) -> Response:
            try:
                return await fn(request)
            except BadRequest as exc:
                return _error(400, str(exc), "InvalidRequest")
            except PropolisGone as exc:  # 424 before a VM exists, 410 once it is gone
                return _error(exc.status or 410, str(exc), "NoInstance")
            except PeerError as exc:
                # A refusal the fake makes (403: a migrating source refuses a state
                # change, as Propolis does) keeps its status; an injected fault "drops".
                if exc.status is not None and 400 <= exc.status < 500:
                    return _error(exc.status, exc.peer_message or str(exc), exc.code)
                return _error(503, str(exc), "Unavailable")

        return wrapped

    @handler
    async def ensure(request: Request) -> Response:
        try:
            await vm.ensure(decode(await request.body(), InstanceEnsureRequest))
        except ValueError as exc:  # a malformed MigrationTarget
            raise BadRequest(str(exc)) from None
        # ``InstanceEnsureResponse``: the migration this VM was created for, if any.
        migrate = None if vm.target is None else {"migration_id": str(vm.target.migration_id)}
        return Response(
            encode({"migrate": migrate}), status_code=201, media_type="application/json"
        )

    @handler
    async def get_instance(request: Request) -> Response:
        return Response(encode(await vm.instance()), media_type="application/json")

    @handler
    async def put_state(request: Request) -> Response:
        await vm.put_state(decode(await request.body(), InstanceStateRequested))
        return Response(status_code=204)

    @handler
    async def state_monitor(request: Request) -> Response:
        wanted = decode(await request.body(), InstanceStateMonitorRequest)
        return Response(encode(await vm.state_monitor(wanted.gen)), media_type="application/json")

    async def control(request: Request) -> Response:
        action, q = request.path_params["action"], request.query_params
        on = q.get("on", "true") != "false"

        def refuse() -> None:
            vm.refuse_requests(
                int(q.get("status", "409")),
                q.get("code"),
                message=q.get("message", "refused (injected)"),
                times=int(q.get("times", "1")),
            )

        def eager() -> None:
            vm.eager = on

        actions: dict[str, Callable[[], None]] = {
            "halt": vm.halt,
            "fail": vm.fail,
            "vanish": vm.vanish,
            "hang": lambda: vm.hang(on),
            "drop": lambda: vm.disconnect(on),
            "refuse": refuse,
            "eager": eager,
        }
        if action not in actions:
            return _error(404, f"no control {action!r}", "NotFound")
        try:
            actions[action]()
        except ValueError as exc:
            return _error(400, f"bad control {action!r}: {exc}", "InvalidRequest")
        return Response(status_code=204)

    return Starlette(
        routes=[
            Route("/instance", ensure, methods=["PUT"]),
            Route("/instance", get_instance, methods=["GET"]),
            Route("/instance/state", put_state, methods=["PUT"]),
            Route("/instance/state-monitor", state_monitor, methods=["GET"]),
            *migration_routes(vm),
            *migration_control_routes(vm),
            Route("/sim/{action}", control, methods=["POST"]),
        ]
    )
