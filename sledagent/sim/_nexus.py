"""A recording Nexus on the real wire: ``PUT /vmms/{propolis_id}`` records and answers 204.

The recording and the fault injection (latency, 5xx for a while, refusals) are
``sledagent.testing.FakeNexus``; this is its HTTP face. Bodies are decoded strictly as
``SledVmmState``: a malformed update is a 400. ``GET /sim/updates`` lists what arrived,
with arrival times; ``POST /sim/wait`` answers once given VMMs reached a state;
``POST /sim/fail?seconds=S&status=503`` and ``POST /sim/latency?seconds=S``
inject faults.

Migrations (``testing/_ledger.py`` checks every update against the protocol):
``GET /sim/migrations`` lists each migration's two sides as received (every report
with its generation, state and arrival time), its outcome (``completed``, ``failed``,
``inconsistent``, ``in_progress``) and the breaks found; ``GET /sim/problems`` every
break (VMMs' and migrations'); ``POST /sim/migrations/wait`` with ``{"ids": [...],
"timeout_s": S, "both_sides": true}`` answers those migrations once each has ended
(with ``both_sides``, once its source has ended too, if it took part); 504 otherwise.
``GET /sim/clock`` is this process's clock (the times above), for a benchmark in
another process to line its own clock up with.
"""

from __future__ import annotations

import json
import uuid

import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .._codec import decode, encode
from .._errors import BadRequest, PeerError
from .._wire import Error, SledVmmState, VmmState
from ..testing._ledger import migration_ended
from ..testing._nexus import FakeNexus


def _error(status: int, message: str, code: str | None = None) -> Response:
    body = Error(message=message, request_id=uuid.uuid4().hex, error_code=code)
    return Response(encode(body), status_code=status, media_type="application/json")


def recording_nexus_app(nexus: FakeNexus) -> Starlette:
    async def put_vmm(request: Request) -> Response:
        try:
            propolis_id = uuid.UUID(request.path_params["propolis_id"])
            state = decode(await request.body(), SledVmmState)
        except (ValueError, BadRequest) as exc:
            return _error(400, str(exc), "InvalidRequest")
        try:
            await nexus.put_vmm_state(propolis_id, state)
        except PeerError as exc:
            return _error(exc.status or 503, str(exc), "ServiceUnavailable")
        return Response(status_code=204)

    async def updates(request: Request) -> Response:
        rows = [
            {"time": u.time, "propolis_id": str(u.propolis_id), "state": u.state}
            for u in nexus.updates
        ]
        return Response(encode(rows), media_type="application/json")

    async def wait(request: Request) -> Response:
        """Answer once every VMM of ``ids`` has reached ``state``: their first times.

        Benchmarks wait here rather than polling ``/sim/updates``, which costs the
        caller a growing parse per poll in the process being measured."""
        try:
            body = json.loads(await request.body())
            wanted = VmmState(body["state"])
            ids = [uuid.UUID(i) for i in body["ids"]]
            timeout = float(body.get("timeout_s", 600))
        except (ValueError, KeyError, TypeError) as exc:
            return _error(400, f"expected {{ids, state, timeout_s}}: {exc}", "InvalidRequest")
        with trio.move_on_after(timeout):
            times = {str(pid): await nexus.wait_for(pid, wanted) for pid in ids}
            return Response(encode(times), media_type="application/json")
        return _error(504, f"not every VMM reached {wanted.value} in {timeout} s")

    async def migrations(request: Request) -> Response:
        rows = [r.as_dict() for r in nexus.ledger.migrations.values()]
        return Response(encode(rows), media_type="application/json")

    async def problems(request: Request) -> Response:
        return Response(encode(nexus.ledger.problems), media_type="application/json")

    async def clock(request: Request) -> Response:
        return Response(encode({"now": trio.current_time()}), media_type="application/json")

    async def wait_migrations(request: Request) -> Response:
        try:
            body = json.loads(await request.body())
            ids = [uuid.UUID(i) for i in body["ids"]]
            timeout = float(body.get("timeout_s", 600))
            both = bool(body.get("both_sides", True))
        except (ValueError, KeyError, TypeError) as exc:
            return _error(400, f"expected {{ids, timeout_s, both_sides}}: {exc}", "InvalidRequest")
        with trio.move_on_after(timeout):
            rows = [
                (await nexus.wait_migration(mid, lambda r: migration_ended(r, both))).as_dict()
                for mid in ids
            ]
            return Response(encode(rows), media_type="application/json")
        return _error(504, f"not every migration ended in {timeout} s")

    async def control(request: Request) -> Response:
        action, q = request.path_params["action"], request.query_params
        try:
            seconds = float(q.get("seconds", "0"))
            if action == "fail":
                status = q.get("status", "503")
                nexus.fail_for(seconds, status=None if status == "none" else int(status))
            elif action == "latency":
                nexus.latency_s = seconds
            else:
                return _error(404, f"no control {action!r}")
        except ValueError as exc:
            return _error(400, str(exc))
        return Response(status_code=204)

    return Starlette(
        routes=[
            Route("/vmms/{propolis_id}", put_vmm, methods=["PUT"]),
            Route("/sim/updates", updates, methods=["GET"]),
            Route("/sim/wait", wait, methods=["POST"]),
            Route("/sim/migrations", migrations, methods=["GET"]),
            Route("/sim/migrations/wait", wait_migrations, methods=["POST"]),
            Route("/sim/problems", problems, methods=["GET"]),
            Route("/sim/clock", clock, methods=["GET"]),
            Route("/sim/{action}", control, methods=["POST"]),
        ]
    )
