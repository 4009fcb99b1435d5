"""The sled-agent HTTP API (``contracts/sled-agent.json``), as a Starlette app.

Handlers only translate: decode and validate the request (msgspec, strict), call the
agent, encode the answer. Every error is ``{message, error_code, request_id}`` with the
status of the ``AgentError`` raised (omicron's codes); malformed paths, queries and bodies
are 400 naming the field, oversized bodies 413, non-JSON bodies 415, unknown routes 404.
Nothing a client sends produces a 500. Beyond omicron (ours, documented in the served
spec): explicit bundle jobs, the reaper's holdings, and the bundle quarantine.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import structlog
import trio
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Match, Route, Router
from starlette.types import Receive, Scope, Send

from ._admission import ReadAdmission, ReadLimits
from ._agent import SledAgent
from ._codec import decode, encode
from ._errors import (
    AgentError,
    BadRequest,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    Unauthorized,
    UnsupportedMediaType,
)
from ._jobs import BundleJob
from ._metrics import metrics_text, registry_for
from ._openapi import openapi_document
from ._quick_reads import bearer_matches, refused_read, state_reads
from ._quick_reads import request_id as new_request_id
from ._wire import (
    BundleJobStatus,
    CleanupContextUpdate,
    Error,
    InstanceEnsureBody,
    VmmPutStateBody,
    ZoneCleanupItem,
)

log = structlog.get_logger("sledagent.api")
T = TypeVar("T")

MAX_BODY_BYTES = 1 << 20
DRAIN_LIMIT_BYTES = 16 << 20
# A zone name is any string (as in the contract): it is only a key into the bundle index
# and the registry, never joined to a path, so an unknown one is simply not found. One
# that could climb out of a directory (``..``, a separator, NUL) is refused outright.
_TRAVERSAL = re.compile(r"\.\.|[/\x00]")


def _json(obj: Any, status: int = 200) -> Response:
    return Response(encode(obj), status_code=status, media_type="application/json")


def _error(exc: AgentError, request_id: str, headers: Mapping[str, str] | None = None) -> Response:
    body = Error(message=exc.message, request_id=request_id, error_code=exc.error_code)
    return Response(
        encode(body),
        status_code=exc.status,
        media_type="application/json",
        headers={"x-request-id": request_id, **(headers or {})},
    )


def _uuid_param(request: Request, name: str) -> uuid.UUID:
    raw = request.path_params[name]
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise BadRequest(f"path parameter `{name}` is not a UUID: {raw!r}") from None


def _zone_param(request: Request) -> str:
    name: str = request.path_params["zone_name"]
    if _TRAVERSAL.search(name):
        raise BadRequest(f"path parameter `zone_name` must not contain '..', '/' or NUL: {name!r}")
    return name


async def _body(request: Request, tp: type[T]) -> T:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise UnsupportedMediaType(f"expected content type application/json, got {ctype!r}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= MAX_BODY_BYTES:
            chunks.append(chunk)
        elif size > DRAIN_LIMIT_BYTES:
            break  # stop reading; the answer below still goes out
    if size > MAX_BODY_BYTES:
        # The rest was read and dropped (up to a bound) so that clients that send the
        # whole body before reading the answer see the 413 instead of a broken pipe.
        raise PayloadTooLarge(f"request body over {MAX_BODY_BYTES} bytes")
    return decode(b"".join(chunks), tp)


def _job_status(job: BundleJob) -> BundleJobStatus:
    return BundleJobStatus(
        job_id=job.job_id,
        zone_name=job.zone_name,
        state=job.state.value,
        time_created=job.time_created,
        bundle=job.bundle,
        error=job.error,
    )


def _confined(paths: tuple[str, ...], roots: list[Path]) -> Path | None:
    """The first copy whose real path lies inside a debug directory (blocking)."""
    real_roots = [r.resolve() for r in roots]
    for p in paths:
        real = Path(p).resolve()
        if any(real.is_relative_to(r) for r in real_roots) and real.is_file():
            return real
    return None


Handler = Callable[[Request], Awaitable[Response]]


def _debug_enabled() -> bool:
    bound = log.bind()
    check = getattr(bound, "is_enabled_for", None)
    return True if check is None else bool(check(logging.DEBUG))


def build_app(
    agent: SledAgent, *, token: str | None = None, reads: ReadLimits | None = None
) -> _Api:
    """The sled-agent API over ``agent``; with ``token``, every route but ``/metrics``
    requires ``Authorization: Bearer <token>`` (compared in constant time). ``reads``:
    when VMM-state reads are refused under overload (``_admission``)."""
    manager, store, jobs = agent.manager, agent.store, agent.jobs
    admission = ReadAdmission(agent.publication_backlog, reads)
    expected = token.encode() if token else None
    metrics_registry = registry_for(agent, admission)
    roots: list[Path] = list(getattr(agent.host.store, "debug_dirs", []))
    # Decided once (logging is configured before the app is built): a filtered-out
    # structlog call through the module's lazy proxy still costs microseconds, and this
    # runs on every request of the agent's one trio thread.
    debug_requests = _debug_enabled()

    def route(path: str, methods: list[str], *, public: bool = False) -> Callable[[Handler], Route]:
        def wrap(handler: Handler) -> Route:
            async def endpoint(request: Request) -> Response:
                request_id = new_request_id()
                try:
                    if expected is not None and not public:
                        given = request.headers.get("authorization", "").encode()
                        if not bearer_matches(given, expected):
                            raise Unauthorized("missing or wrong bearer token")
                    response = await handler(request)
                except Overloaded as exc:  # shed: counted and logged per burst, not here
                    headers = {"retry-after": str(exc.retry_after_s)}
                    return _error(exc, request_id, headers)
                except AgentError as exc:
                    # Every error answer is in the log under the id the client was given.
                    (log.warning if exc.status >= 500 else log.info)(
                        "api_refused",
                        request_id=request_id,
                        method=request.method,
                        path=request.url.path,
                        status=exc.status,
                        error_code=exc.error_code,
                        message=exc.message,
                    )
                    # A 503 says when to try again (RFC 9110 10.2.3): Nexus's client and
                    # ours (``RetryOverloaded``) wait that long instead of hammering.
                    retry = {"retry-after": "1"} if exc.status == 503 else None
                    return _error(exc, request_id, retry)
                except ClientDisconnect:
                    raise  # the server ended the request (bad, slow or cut-off body): no bug
                except Exception:  # a bug: logged with its request id, never a traceback
                    log.exception(
                        "api_error",
                        request_id=request_id,
                        method=request.method,
                        path=request.url.path,
                    )
                    return _error(AgentError("internal error"), request_id)
                if debug_requests:
                    log.debug(
                        "api_request",
                        request_id=request_id,
                        method=request.scope["method"],
                        path=request.scope["path"],
                        status=response.status_code,
                    )
                response.headers["x-request-id"] = request_id
                return response

            return Route(path, endpoint, methods=methods)

        return wrap

    # --- VMMs -------------------------------------------------------------------------

    @route("/vmms/{propolis_id}", ["PUT"])
    async def vmm_register(request: Request) -> Response:
        propolis_id = _uuid_param(request, "propolis_id")
        body = await _body(request, InstanceEnsureBody)
        return _json(await manager.register_durably(propolis_id, body))

    @route("/vmms/{propolis_id}", ["DELETE"])
    async def vmm_unregister(request: Request) -> Response:
        return _json(await manager.unregister(_uuid_param(request, "propolis_id")))

    @route("/vmms/{propolis_id}/state", ["GET"])
    async def vmm_get_state(request: Request) -> Response:
        propolis_id = _uuid_param(request, "propolis_id")
        if not manager.inline and (reason := admission.check()) is not None:
            raise refused_read(reason, admission.retry_after_s)
        return _json(await manager.get_state(propolis_id))

    @route("/vmms/{propolis_id}/state", ["PUT"])
    async def vmm_put_state(request: Request) -> Response:
        propolis_id = _uuid_param(request, "propolis_id")
        body = await _body(request, VmmPutStateBody)
        return _json(await manager.put_state(propolis_id, body.state))

    # --- zones and bundles ------------------------------------------------------------

    @route("/zones", ["GET"])
    async def zones_list(request: Request) -> Response:
        return _json(sorted(z.name for z in await agent.host.backend.list_zones()))

    @route("/zones/bundles", ["GET"])
    async def zone_bundle_list_all(request: Request) -> Response:
        zone_filter = request.query_params.get("filter")
        return _json([b.metadata for b in await store.list_all(zone_filter)])

    @route("/zones/bundles/{zone_name}", ["GET"])
    async def zone_bundle_list(request: Request) -> Response:
        return _json([b.metadata for b in await store.list_zone(_zone_param(request))])

    @route("/zones/bundles/{zone_name}", ["POST"])
    async def zone_bundle_create(request: Request) -> Response:
        return _json(_job_status(jobs.create(_zone_param(request))), status=202)

    @route("/zones/bundles/{zone_name}/{bundle_id}", ["GET"])
    async def zone_bundle_get(request: Request) -> Response:
        zone_name, bundle_id = _zone_param(request), _uuid_param(request, "bundle_id")
        # Checked before serving: a copy that is no longer whole (truncated since it was
        # indexed) is quarantined; with none left the answer is 404 naming why.
        info = await store.get_verified(zone_name, bundle_id)
        path = None if info is None else await trio.to_thread.run_sync(_confined, info.paths, roots)
        if path is None:
            raise NotFound(f"no bundle {bundle_id} for zone {zone_name}")
        return FileResponse(path, media_type="application/gzip", filename=path.name)

    @route("/zones/bundles/{zone_name}/{bundle_id}", ["DELETE"])
    async def zone_bundle_delete(request: Request) -> Response:
        zone_name, bundle_id = _zone_param(request), _uuid_param(request, "bundle_id")
        if not await store.delete(zone_name, bundle_id):
            raise NotFound(f"no bundle {bundle_id} for zone {zone_name}")
        return Response(status_code=204)

    @route("/zones/bundle-jobs/{job_id}", ["GET"])
    async def zone_bundle_job(request: Request) -> Response:
        return _json(_job_status(jobs.get(_uuid_param(request, "job_id"))))

    @route("/zones/bundle-cleanup/utilization", ["GET"])
    async def zone_bundle_utilization(request: Request) -> Response:
        return _json(await store.utilization())

    @route("/zones/bundle-cleanup/context", ["GET"])
    async def zone_bundle_cleanup_context(request: Request) -> Response:
        return _json(store.cleanup_context())

    @route("/zones/bundle-cleanup/context", ["PUT"])
    async def zone_bundle_cleanup_context_update(request: Request) -> Response:
        await store.update_context(await _body(request, CleanupContextUpdate))
        return Response(status_code=204)

    @route("/zones/bundle-cleanup", ["POST"])
    async def zone_bundle_cleanup(request: Request) -> Response:
        return _json(await store.cleanup())

    @route("/zones/bundle-cleanup/quarantine", ["GET"])
    async def zone_bundle_quarantine(request: Request) -> Response:
        return _json(await store.quarantine())

    @route("/zones/cleanup", ["GET"])
    async def zones_cleanup(request: Request) -> Response:
        return _json(
            [
                ZoneCleanupItem(
                    zone_name=item.defunct.zone.name,
                    cause=item.defunct.cause,
                    step=item.step.value,
                    archiving=item.archiving,
                    since=item.since,
                    bundle_attempts=item.bundle_attempts,
                    bundle_error=item.bundle_error,
                    halt_attempts=item.halt_attempts,
                    halt_error=item.halt_error,
                )
                for item in agent.reaper.holdings()
            ]
        )

    @route("/openapi.json", ["GET"])
    async def openapi(request: Request) -> Response:
        return _json(openapi_document())

    @route("/metrics", ["GET"], public=True)
    async def metrics(request: Request) -> Response:
        return Response(metrics_text(metrics_registry), media_type=CONTENT_TYPE_LATEST)

    routes = [
        openapi,
        metrics,
        vmm_register,
        vmm_unregister,
        vmm_get_state,
        vmm_put_state,
        zones_list,
        zone_bundle_list_all,
        zone_bundle_list,
        zone_bundle_create,
        zone_bundle_get,
        zone_bundle_delete,
        zone_bundle_job,
        zone_bundle_utilization,
        zone_bundle_cleanup_context,
        zone_bundle_cleanup_context_update,
        zone_bundle_cleanup,
        zone_bundle_quarantine,
        zones_cleanup,
    ]

    registry = manager.registry

    # The server's quick path for state reads: the same answers as ``vmm_get_state``,
    # without the router. Inline: reads queue behind the runner (the router's).
    quick_get = None
    if not manager.inline:
        quick_get = state_reads(
            registry.answer,
            lambda propolis_id: registry.find(propolis_id) is not None,
            admission,
            token=expected,
            debug_requests=debug_requests,
        )

    return _Api(Router(routes=routes), quick_get=quick_get, admission=admission)


class _Api:
    """The ASGI app: Starlette's router, and JSON errors for what no route answers.

    Not a ``Starlette`` application: its two middleware layers (server errors,
    exception handlers) wrap every ``send`` of every request, and each handler here
    already turns every exception into the contract's error body. Measured on
    ``GET /vmms/{id}/state`` from another process: 1.26 ms -> see docs/performance.md.
    """

    def __init__(
        self,
        router: Router,
        *,
        quick_get: Callable[[bytes, bytes], Awaitable[bytes | None]] | None = None,
        admission: ReadAdmission | None = None,
    ) -> None:
        self.router = router
        #: The server's quick path for state reads (``_http.QuickGet``).
        self.quick_get = quick_get
        #: What state reads were refused (``sledagent_reads_shed_total``).
        self.admission = admission

    @property
    def routes(self) -> list[BaseRoute]:
        return self.router.routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["app"] = self  # the router then raises HTTPException for 404 and 405
        try:
            await self.router(scope, receive, send)
        except HTTPException as exc:
            # Unknown routes and methods: the same error body as everything else.
            err = AgentError(exc.detail)
            err.status = exc.status_code
            err.error_code = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}.get(
                exc.status_code, "INVALID_REQUEST"
            )
            headers = {"Allow": self._allowed(scope)} if exc.status_code == 405 else None
            await _error(err, new_request_id(), headers)(scope, receive, send)

    def _allowed(self, scope: Scope) -> str:
        """The methods of every route on this path (RFC 9110 asks for them with a 405);
        Starlette's own header names only the first route, one method here."""
        methods: set[str] = set()
        for route in self.router.routes:
            if isinstance(route, Route) and route.matches(scope)[0] is Match.PARTIAL:
                methods |= route.methods or set()
        return ", ".join(sorted(methods))
