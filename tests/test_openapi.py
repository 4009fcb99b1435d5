"""The served spec is generated from the models and agrees with the contract."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.routing import Route

from sledagent._api import build_app
from sledagent._openapi import OPERATIONS, openapi_document

from .conftest import Contract

OURS = openapi_document()


def contract_operations(contract: Contract) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (path, method, op)
        for path, ops in contract.document["paths"].items()
        for method, op in ops.items()
    ]


def test_every_contract_operation_is_served_with_its_id_parameters_and_status(
    sled_agent_contract: Contract,
) -> None:
    for path, method, op in contract_operations(sled_agent_contract):
        ours = OURS["paths"].get(path, {}).get(method)
        assert ours is not None, f"{method.upper()} {path} is not served"
        assert ours["operationId"] == op["operationId"]
        theirs_params = {(p["in"], p["name"]) for p in op.get("parameters", [])}
        ours_params = {(p["in"], p["name"]) for p in ours.get("parameters", [])}
        assert ours_params == theirs_params, (method, path)
        theirs_ok = {s for s in op["responses"] if s[0] == "2"}
        ours_ok = {s for s in ours["responses"] if s[0] == "2"}
        assert ours_ok == theirs_ok, (method, path)
        assert ("requestBody" in ours) == ("requestBody" in op), (method, path)


def test_operations_beyond_the_contract_are_ours_and_tagged(sled_agent_contract: Contract) -> None:
    theirs = {(p, m) for p, m, _ in contract_operations(sled_agent_contract)}
    for op in OPERATIONS:
        assert ((op.path, op.method) in theirs) != op.ours, (op.method, op.path)


def _schemas_in_both(contract: Contract) -> list[str]:
    theirs = contract.document["components"]["schemas"]
    return sorted(set(theirs) & set(OURS["components"]["schemas"]))


def test_shared_object_schemas_have_the_same_properties_and_required_fields(
    sled_agent_contract: Contract,
) -> None:
    theirs = sled_agent_contract.document["components"]["schemas"]
    ours = OURS["components"]["schemas"]
    compared = 0
    for name in _schemas_in_both(sled_agent_contract):
        if "properties" not in theirs[name]:
            continue
        compared += 1
        assert set(ours[name]["properties"]) == set(theirs[name]["properties"]), name
        assert set(ours[name].get("required", [])) == set(theirs[name].get("required", [])), name
    assert compared >= 12


def _format(prop: dict[str, Any]) -> str | None:
    """A property's string format, through ``anyOf [..., null]`` (ours) or none."""
    for alt in prop.get("anyOf", [prop]):
        if "format" in alt:
            return str(alt["format"])
    return None


def test_timestamps_and_ids_carry_the_contract_format(sled_agent_contract: Contract) -> None:
    # A client generating requests from our document (schemathesis) sends what the
    # format says; without it, it sends "" for a timestamp and every request is refused.
    theirs = sled_agent_contract.document["components"]["schemas"]
    ours = OURS["components"]["schemas"]
    checked = 0
    for name in _schemas_in_both(sled_agent_contract):
        for prop, schema in theirs[name].get("properties", {}).items():
            if schema.get("format") in ("date-time", "uuid"):
                checked += 1
                assert _format(ours[name]["properties"][prop]) == schema["format"], (name, prop)
    assert checked >= 8


@pytest.mark.parametrize(
    "name", ["VmmState", "MigrationState", "ZoneBundleCause", "PriorityDimension"]
)
def test_shared_enums_have_the_same_values(name: str, sled_agent_contract: Contract) -> None:
    theirs = sled_agent_contract.document["components"]["schemas"][name]
    values = [v for o in theirs["oneOf"] for v in o["enum"]]
    assert sorted(OURS["components"]["schemas"][name]["enum"]) == sorted(values)


def test_the_requested_state_types_are_the_contract_variants(sled_agent_contract: Contract) -> None:
    theirs = sled_agent_contract.document["components"]["schemas"]["VmmStateRequested"]
    variants = sorted(o["properties"]["type"]["enum"][0] for o in theirs["oneOf"])
    assert sorted(OURS["components"]["schemas"]["VmmStateRequestedType"]["enum"]) == variants


def test_the_spec_and_the_router_name_the_same_routes() -> None:
    from unittest.mock import MagicMock

    app = build_app(MagicMock())
    routed = {
        (r.path, m.lower())
        for r in app.routes
        if isinstance(r, Route)
        for m in (r.methods or ()) - {"HEAD"}
    }
    documented = {(p, m) for p, ops in OURS["paths"].items() for m in ops}
    assert routed == documented
