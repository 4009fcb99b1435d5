"""Live migration between simulated Propolis servers, over plain HTTP.

Propolis's target opens a websocket to ``/instance/migrate/{migration_id}/start`` on the
source and runs the protocol's phases over it. Here the target (``run_migration_in``
with an ``HttpSourceLink``) sends one request per step to the source's simulated
Propolis, possibly in another ``sledagent sim`` process (another sled):

- ``POST /instance/migrate/{id}/start``: the source, if running and free, begins its
  migration out (``migration_out`` Sync); 403 (not running, a stop pending), 409
  (already migrating), 424 ``NoInstance`` (no VM);
- ``POST /instance/migrate/{id}/phase/{phase}``: the source runs that phase (RamPush,
  Pause, RamPushDirty, Device, RamPull, Server); Server answers the guest's console
  history ``{"console": [...]}``, which the target takes over;
- ``POST /instance/migrate/{id}/finish``: hand-over; the source reports Finish, answers,
  and then stops (Stopping, Stopped, Destroyed);
- ``POST /instance/migrate/{id}/abort``: the target failed; the source reports Error and
  resumes.

A source whose target goes silent between requests for ``migration_idle_s`` fails its
migration and resumes (Propolis's websocket closes at once when the target dies).

Controls of each simulated Propolis (``/sim/...``, for tests and operators):
``POST /sim/migration-hold?phase=Device[&on=false]`` stops this VM's side before a
phase until released; ``GET /sim/migration?held=Device&timeout_s=S`` answers this VM's
migration status, once it is held before that phase when ``held`` is given (408 if not
within ``timeout_s``); ``POST /sim/migration-fail?phase=Device`` fails the migration at
that phase (``phase=none`` clears it); ``POST /sim/migration-timing?phase_s=&idle_s=``
sets each phase's duration on a source and a source's wait for its silent target;
``GET /sim/console`` the guest's console history, ``POST /sim/console`` (a line of text)
the guest writing to it.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Awaitable, Callable

import trio
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .._errors import PeerError, PropolisGone
from .._h1client import ConnectionFailed, H1Pool
from .._wire import PropolisMigrationState as Phase
from ..testing._migrate import MigrationFailed
from ..testing._propolis import FakePropolis

#: A step the source takes longer than this to answer has failed (beyond a phase's
#: simulated duration; a source that never answers ``start`` is the agent's deadline).
STEP_TIMEOUT_S = 60.0
_JSON = (("content-type", "application/json"),)


def _error(status: int, message: str) -> Response:
    body = {"message": message, "request_id": uuid.uuid4().hex, "error_code": None}
    return JSONResponse(body, status)


def migration_routes(vm: FakePropolis) -> list[Route]:
    """The source's side of the exchange, over ``vm``."""

    def handler(
        fn: Callable[[Request, uuid.UUID], Awaitable[Response]],
    ) -> Callable[[Request], Awaitable[Response]]:
        async def wrapped(request: Request) -> Response:
            try:
                mid = uuid.UUID(request.path_params["migration_id"])
            except ValueError:
                return _error(400, "migration_id: not a UUID")
            try:
                return await fn(request, mid)
            except PropolisGone as exc:
                body = {"message": str(exc), "request_id": uuid.uuid4().hex}
                return JSONResponse({**body, "error_code": "NoInstance"}, exc.status or 410)
            except PeerError as exc:
                return _error(exc.status or 500, f"migration failed: {exc}")

        return wrapped

    @handler
    async def start(request: Request, mid: uuid.UUID) -> Response:
        await vm.migrate_out_start(mid)
        return JSONResponse({"protocol": "sim-http-v0"})

    @handler
    async def phase(request: Request, mid: uuid.UUID) -> Response:
        try:
            step = Phase(request.path_params["phase"])
        except ValueError:
            return _error(400, f"no migration phase {request.path_params['phase']!r}")
        history = await vm.migrate_out_phase(mid, step)
        return JSONResponse({} if history is None else {"console": history})

    @handler
    async def finish(request: Request, mid: uuid.UUID) -> Response:
        vm.migrate_out_finish(mid)
        # Stopped once the answer is on its way: the target runs the guest from now on.
        return JSONResponse({}, background=BackgroundTask(_stop_later, vm))

    @handler
    async def abort(request: Request, mid: uuid.UUID) -> Response:
        try:
            reason = str(json.loads(await request.body()).get("reason", "the target failed"))
        except (ValueError, AttributeError):
            reason = "the target failed"
        vm.migrate_out_abort(mid, reason)
        return Response(status_code=204)

    base = "/instance/migrate/{migration_id}"
    return [
        Route(f"{base}/start", start, methods=["POST"]),
        Route(f"{base}/phase/{{phase}}", phase, methods=["POST"]),
        Route(f"{base}/finish", finish, methods=["POST"]),
        Route(f"{base}/abort", abort, methods=["POST"]),
    ]


async def _stop_later(vm: FakePropolis) -> None:
    await trio.lowlevel.checkpoint()
    vm.migrated_out_stop()


def migration_status(vm: FakePropolis) -> dict[str, object]:
    m = vm.migration
    return {
        "state": vm.state.value,
        "gen": vm.gen,
        "migration_in": None
        if m.migration_in is None
        else {"id": str(m.migration_in.id), "state": m.migration_in.state.value},
        "migration_out": None
        if m.migration_out is None
        else {"id": str(m.migration_out.id), "state": m.migration_out.state.value},
        "held_at": None if vm.held_at is None else vm.held_at.value,
        "holds": sorted(p.value for p in vm.holds),
    }


def migration_control_routes(vm: FakePropolis) -> list[Route]:
    """The ``/sim/...`` controls of ``vm``'s migrations and console (module doc)."""

    def phase_of(request: Request) -> Phase | None:
        raw = request.query_params.get("phase", "")
        return None if raw in ("", "none") else Phase(raw)

    async def hold(request: Request) -> Response:
        try:
            phase = phase_of(request)
        except ValueError as exc:
            return _error(400, f"phase: {exc}")
        if phase is None:
            return _error(400, "phase: required")
        vm.hold(phase, request.query_params.get("on", "true") != "false")
        return Response(status_code=204)

    async def fail(request: Request) -> Response:
        try:
            vm.migration_fail_at = phase_of(request)
        except ValueError as exc:
            return _error(400, f"phase: {exc}")
        return Response(status_code=204)

    async def timing(request: Request) -> Response:
        q = request.query_params
        try:
            phase_s = float(q.get("phase_s", vm.migration_phase_s))
            idle_s = float(q.get("idle_s", vm.migration_idle_s))
        except ValueError as exc:
            return _error(400, str(exc))
        if not (math.isfinite(phase_s) and math.isfinite(idle_s)) or phase_s < 0 or idle_s <= 0:
            return _error(400, "phase_s must be >= 0 and idle_s > 0 (finite seconds)")
        vm.migration_phase_s, vm.migration_idle_s = phase_s, idle_s
        return Response(status_code=204)

    async def status(request: Request) -> Response:
        q = request.query_params
        try:
            held = None if "held" not in q else Phase(q["held"])
            timeout = float(q.get("timeout_s", "30"))
            if not math.isfinite(timeout) or timeout < 0:
                raise ValueError(f"timeout_s must be finite seconds >= 0, not {timeout}")
        except ValueError as exc:
            return _error(400, str(exc))
        if held is not None:
            with trio.move_on_after(timeout):
                await vm.wait_held(held)
            if vm.held_at is not held:
                return _error(408, f"not held before {held.value} within {timeout:g} s")
        return JSONResponse(migration_status(vm))

    async def console(request: Request) -> Response:
        if request.method == "POST":
            vm.write_console((await request.body()).decode("utf-8", "replace").rstrip("\n"))
            return Response(status_code=204)
        return JSONResponse({"console": vm.console})

    return [
        Route("/sim/migration-hold", hold, methods=["POST"]),
        Route("/sim/migration-fail", fail, methods=["POST"]),
        Route("/sim/migration-timing", timing, methods=["POST"]),
        Route("/sim/migration", status, methods=["GET"]),
        Route("/sim/console", console, methods=["GET", "POST"]),
    ]


class HttpSourceLink:
    """The target's ``SourceLink`` to a simulated Propolis at ``src_addr`` over HTTP."""

    def __init__(self, src_addr: str) -> None:
        self._addr = src_addr
        self._pool: H1Pool | None = None

    async def _post(
        self, target: str, body: bytes = b"", timeout_s: float | None = STEP_TIMEOUT_S
    ) -> dict[str, object]:
        if self._pool is None:
            try:
                self._pool = H1Pool(f"http://{self._addr}", max_connections=1, max_idle=1)
            except ValueError as exc:
                raise MigrationFailed(f"source address {self._addr!r}: {exc}") from None
        try:
            response = await self._pool.request(
                "POST", target, body, headers=_JSON, timeout_s=timeout_s
            )
        except ConnectionFailed as exc:
            raise MigrationFailed(f"couldn't reach the source at {self._addr}: {exc}") from exc
        if response.status not in (200, 204):
            text = response.body[:200].decode("utf-8", "replace")
            raise MigrationFailed(
                f"source at {self._addr} answered {response.status}: {text}",
                status=response.status,
            )
        try:
            answer = json.loads(response.body) if response.body else {}
        except ValueError:
            raise MigrationFailed(f"source at {self._addr}: not JSON") from None
        return answer if isinstance(answer, dict) else {}

    async def start(self, migration_id: uuid.UUID) -> None:
        # No deadline of its own (Propolis's target has none): a source that never
        # answers is the agent's ``migration_source_timeout_s``.
        await self._post(f"/instance/migrate/{migration_id}/start", timeout_s=None)

    async def phase(self, migration_id: uuid.UUID, phase: Phase) -> list[str] | None:
        answer = await self._post(f"/instance/migrate/{migration_id}/phase/{phase.value}")
        console = answer.get("console")
        if console is None:
            return None
        if not isinstance(console, list):
            raise MigrationFailed(f"source at {self._addr}: malformed console history")
        return [str(line) for line in console]

    async def finish(self, migration_id: uuid.UUID) -> None:
        await self._post(f"/instance/migrate/{migration_id}/finish")

    async def abort(self, migration_id: uuid.UUID, reason: str) -> None:
        body = json.dumps({"reason": reason}).encode()
        await self._post(f"/instance/migrate/{migration_id}/abort", body)

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.aclose()
