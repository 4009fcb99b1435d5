"""The served OpenAPI document, generated from the attrs models (msgspec's JSON Schema).

The operation table below is the one place that says which paths exist, with which
parameters, bodies and answers; ``tests/test_openapi.py`` checks it path by path and
schema by schema against ``contracts/sled-agent.json``. Operations of ours (beyond
omicron) are tagged ``sledagent``. Schemas are JSON Schema 2020-12 (OpenAPI 3.1), so a
nullable field is ``anyOf [..., null]`` where the 3.0 contract says ``nullable: true``.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import attrs
import msgspec

from ._wire import (
    BundleJobStatus,
    BundleUtilization,
    CleanupContext,
    CleanupContextUpdate,
    CleanupCount,
    Error,
    InstanceEnsureBody,
    QuarantinedFile,
    SledVmmState,
    VmmPutStateBody,
    VmmPutStateResponse,
    VmmUnregisterResponse,
    ZoneBundleMetadata,
    ZoneCleanupItem,
)

_UUID = {"type": "string", "format": "uuid"}
_STR = {"type": "string"}


@attrs.frozen
class Operation:
    method: str
    path: str
    operation_id: str
    summary: str
    path_params: tuple[tuple[str, dict[str, Any]], ...] = ()
    query_params: tuple[tuple[str, dict[str, Any]], ...] = ()
    body: Any = None  # a model type
    status: int = 200
    answer: Any = None  # a model type, list[...] / dict[str, ...], "gzip", "text" or None
    ours: bool = False
    #: OpenAPI links from the success answer: (operationId, parameter, runtime expression).
    #: They say which request feeds which, so a stateful client (schemathesis) can register
    #: a VMM and then drive, read and unregister that same VMM.
    links: tuple[tuple[str, str, str], ...] = ()


PID = (("propolis_id", _UUID),)
SAME_VMM = "$request.path.propolis_id"
_VMM_LINKS = (
    ("vmm_get_state", "propolis_id", SAME_VMM),
    ("vmm_put_state", "propolis_id", SAME_VMM),
    ("vmm_unregister", "propolis_id", SAME_VMM),
)
ZONE = (("zone_name", _STR),)
BUNDLE = (("zone_name", _STR), ("bundle_id", _UUID))

OPERATIONS: tuple[Operation, ...] = (
    Operation("put", "/vmms/{propolis_id}", "vmm_register", "Register a VMM with this sled.",
              PID, body=InstanceEnsureBody, answer=SledVmmState, links=_VMM_LINKS),
    Operation("delete", "/vmms/{propolis_id}", "vmm_unregister", "Unregister (destroy) a VMM.",
              PID, answer=VmmUnregisterResponse),
    Operation("get", "/vmms/{propolis_id}/state", "vmm_get_state", "A VMM's current state.",
              PID, answer=SledVmmState),
    Operation("put", "/vmms/{propolis_id}/state", "vmm_put_state", "Drive a VMM to a state.",
              PID, body=VmmPutStateBody, answer=VmmPutStateResponse, links=_VMM_LINKS[:1]),
    Operation("get", "/zones", "zones_list", "The zones on this sled.", answer=list[str]),
    Operation("get", "/zones/bundles", "zone_bundle_list_all", "All zone bundles.",
              query_params=(("filter", {"anyOf": [_STR, {"type": "null"}]}),),
              answer=list[ZoneBundleMetadata]),
    Operation("get", "/zones/bundles/{zone_name}", "zone_bundle_list", "A zone's bundles.",
              ZONE, answer=list[ZoneBundleMetadata]),
    Operation("post", "/zones/bundles/{zone_name}", "zone_bundle_create",
              "Bundle a live zone now (an asynchronous job).", ZONE, status=202,
              answer=BundleJobStatus, ours=True,
              links=(("zone_bundle_job_get", "job_id", "$response.body#/job_id"),)),
    Operation("get", "/zones/bundles/{zone_name}/{bundle_id}", "zone_bundle_get",
              "Download a bundle (application/gzip). Checked first: a copy that is not "
              "whole is quarantined; 404 if none is.", BUNDLE, answer="gzip"),
    Operation("delete", "/zones/bundles/{zone_name}/{bundle_id}", "zone_bundle_delete",
              "Delete a bundle, every copy.", BUNDLE, status=204),
    Operation("get", "/zones/bundle-jobs/{job_id}", "zone_bundle_job_get",
              "A bundle job's status.", (("job_id", _UUID),), answer=BundleJobStatus, ours=True),
    Operation("get", "/zones/bundle-cleanup/utilization", "zone_bundle_utilization",
              "Bundle usage per debug directory.", answer=dict[str, BundleUtilization]),
    Operation("get", "/zones/bundle-cleanup/context", "zone_bundle_cleanup_context",
              "The cleanup context.", answer=CleanupContext),
    Operation("put", "/zones/bundle-cleanup/context", "zone_bundle_cleanup_context_update",
              "Update the cleanup context.", body=CleanupContextUpdate, status=204),
    Operation("post", "/zones/bundle-cleanup", "zone_bundle_cleanup",
              "Apply retention now.", answer=dict[str, CleanupCount]),
    Operation("get", "/zones/bundle-cleanup/quarantine", "zone_bundle_quarantine",
              "Files in the debug directories that are not whole bundles (unreadable, "
              "truncated...), moved to <debug_dir>/.quarantine/: counted in bytes_used, "
              "removed first by cleanup. Scans the directories first.",
              answer=list[QuarantinedFile], ours=True),
    Operation("get", "/zones/cleanup", "zones_cleanup", "What the reaper holds, by step.",
              answer=list[ZoneCleanupItem], ours=True),
    Operation("get", "/metrics", "metrics", "Prometheus metrics (no token needed).",
              answer="text", ours=True),
    Operation("get", "/openapi.json", "openapi", "This document.", answer=dict[str, Any],
              ours=True),
)  # fmt: skip


@cache
def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the served API (built once)."""
    models: list[Any] = [Error]
    for op in OPERATIONS:
        for tp in (op.body, op.answer):
            if tp is not None and not isinstance(tp, str):
                models.append(tp)
    schemas, components = msgspec.json.schema_components(
        models, ref_template="#/components/schemas/{name}"
    )
    by_type = dict(zip(map(id, models), schemas, strict=True))
    error = {
        "description": "Error",
        "content": {"application/json": {"schema": by_type[id(Error)]}},
    }
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        params = [
            {"in": "path", "name": n, "required": True, "schema": s} for n, s in op.path_params
        ] + [{"in": "query", "name": n, "schema": s} for n, s in op.query_params]
        entry: dict[str, Any] = {"operationId": op.operation_id, "summary": op.summary}
        if params:
            entry["parameters"] = params
        if op.ours:
            entry["tags"] = ["sledagent"]
        if op.body is not None:
            entry["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": by_type[id(op.body)]}},
            }
        ok: dict[str, Any] = {"description": "successful operation"}
        if op.answer == "gzip":
            ok["content"] = {"application/gzip": {"schema": {"type": "string", "format": "binary"}}}
        elif op.answer == "text":
            ok["content"] = {"text/plain": {"schema": {"type": "string"}}}
        elif op.answer is not None:
            ok["content"] = {"application/json": {"schema": by_type[id(op.answer)]}}
        if op.links:
            ok["links"] = {
                target: {"operationId": target, "parameters": {param: expr}}
                for target, param, expr in op.links
            }
        entry["responses"] = {str(op.status): ok, "4XX": {"$ref": "#/components/responses/Error"},
                              "5XX": {"$ref": "#/components/responses/Error"}}  # fmt: skip
        paths.setdefault(op.path, {})[op.method] = entry
    return {
        "openapi": "3.1.0",
        "info": {"title": "sledagent: the sled-agent API subset", "version": "48.0.0-sledagent"},
        "paths": paths,
        "components": {"schemas": components, "responses": {"Error": error}},
    }
