"""Wire models match the contracts field for field, and serialize to valid documents."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import attrs
import pytest

from sledagent import BadRequest
from sledagent._codec import decode, encode, to_builtins
from sledagent._wire import (
    Error,
    InstanceEnsureBody,
    InstanceMigrateStatusResponse,
    InstanceMigrationStatus,
    InstanceState,
    InstanceStateMonitorRequest,
    InstanceStateMonitorResponse,
    MigrationRuntimeState,
    MigrationState,
    PropolisMigrationState,
    SledVmmState,
    VmmPutStateBody,
    VmmPutStateResponse,
    VmmRuntimeState,
    VmmState,
    VmmStateRequested,
    VmmStateRequestedType,
    VmmUnregisterResponse,
    ZoneBundleCause,
    ZoneBundleId,
    ZoneBundleMetadata,
)
from sledagent.testing import ensure_body_json

from .conftest import Contract

NOW = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)


def full_state() -> SledVmmState:
    mig = MigrationRuntimeState(
        gen=2, migration_id=uuid.uuid4(), state=MigrationState.IN_PROGRESS, time_updated=NOW
    )
    return SledVmmState(
        vmm_state=VmmRuntimeState(gen=7, state=VmmState.MIGRATING, time_updated=NOW),
        migration_in=None,
        migration_out=mig,
    )


def as_json(obj: Any) -> Any:
    import json

    return json.loads(encode(obj))


# model class -> (contract, schema name)
SLED = "sled-agent.json"
PROPOLIS = "propolis-server.json"
MODELS: list[tuple[type[Any], str, str]] = [
    (VmmRuntimeState, SLED, "VmmRuntimeState"),
    (SledVmmState, SLED, "SledVmmState"),
    (MigrationRuntimeState, SLED, "MigrationRuntimeState"),
    (VmmPutStateBody, SLED, "VmmPutStateBody"),
    (VmmPutStateResponse, SLED, "VmmPutStateResponse"),
    (VmmUnregisterResponse, SLED, "VmmUnregisterResponse"),
    (InstanceEnsureBody, SLED, "InstanceEnsureBody"),
    (Error, SLED, "Error"),
    (ZoneBundleMetadata, SLED, "ZoneBundleMetadata"),
    (ZoneBundleId, SLED, "ZoneBundleId"),
    (InstanceStateMonitorResponse, PROPOLIS, "InstanceStateMonitorResponse"),
    (InstanceStateMonitorRequest, PROPOLIS, "InstanceStateMonitorRequest"),
    (InstanceMigrateStatusResponse, PROPOLIS, "InstanceMigrateStatusResponse"),
    (InstanceMigrationStatus, PROPOLIS, "InstanceMigrationStatus"),
]


@pytest.mark.parametrize(("model", "doc", "schema"), MODELS, ids=[m[2] for m in MODELS])
def test_model_fields_are_the_contract_properties(
    model: type[Any], doc: str, schema: str, request: pytest.FixtureRequest
) -> None:
    contract: Contract = request.getfixturevalue(
        "sled_agent_contract" if doc == SLED else "propolis_contract"
    )
    spec = contract.document["components"]["schemas"][schema]
    fields = attrs.fields_dict(model)
    assert set(fields) == set(spec["properties"])
    required_by_us = {n for n, f in fields.items() if f.default is attrs.NOTHING}
    # Every field the contract requires is required when we decode, except Propolis's
    # `migration`, which we default to "no migration" (an empty status).
    assert set(spec.get("required", [])) - required_by_us <= {"migration"}


@pytest.mark.parametrize(
    ("enum_cls", "doc", "schema"),
    [
        (VmmState, SLED, "VmmState"),
        (MigrationState, SLED, "MigrationState"),
        (ZoneBundleCause, SLED, "ZoneBundleCause"),
        (InstanceState, PROPOLIS, "InstanceState"),
        (PropolisMigrationState, PROPOLIS, "MigrationState"),
    ],
)
def test_enum_values_are_the_contract_values(
    enum_cls: Any, doc: str, schema: str, request: pytest.FixtureRequest
) -> None:
    contract: Contract = request.getfixturevalue(
        "sled_agent_contract" if doc == SLED else "propolis_contract"
    )
    spec = contract.document["components"]["schemas"][schema]
    values = spec["enum"] if "enum" in spec else [v for o in spec["oneOf"] for v in o["enum"]]
    assert sorted(e.value for e in enum_cls) == sorted(values)


def test_sled_vmm_state_is_valid_for_sled_agent_and_nexus(
    sled_agent_contract: Contract, nexus_contract: Contract
) -> None:
    minimal = SledVmmState(
        vmm_state=VmmRuntimeState(gen=1, state=VmmState.RUNNING, time_updated=NOW)
    )
    for state in (minimal, full_state()):
        sled_agent_contract.validate("SledVmmState", as_json(state))
        nexus_contract.validate("SledVmmState", as_json(state))


def test_put_state_and_unregister_responses_are_valid(sled_agent_contract: Contract) -> None:
    for resp in (VmmPutStateResponse(full_state()), VmmPutStateResponse(None)):
        sled_agent_contract.validate("VmmPutStateResponse", as_json(resp))
    for unreg in (VmmUnregisterResponse(full_state()), VmmUnregisterResponse(None)):
        sled_agent_contract.validate("VmmUnregisterResponse", as_json(unreg))


@pytest.mark.parametrize("kind", list(VmmStateRequestedType))
def test_every_requested_state_round_trips_as_the_contract_says(
    kind: VmmStateRequestedType, sled_agent_contract: Contract
) -> None:
    from sledagent._wire import InstanceMigrationTargetParams

    value = (
        InstanceMigrationTargetParams("[fd00::1]:12400")
        if kind is VmmStateRequestedType.MIGRATION_TARGET
        else None
    )
    body = VmmPutStateBody(VmmStateRequested(kind, value))
    doc = {"state": to_builtins(body.state)}
    sled_agent_contract.validate("VmmPutStateBody", doc)
    if value is None:
        assert doc["state"] == {"type": kind.value}  # no `value: null`
        assert encode(body.state) == f'{{"type":"{kind.value}"}}'.encode()
    assert decode(as_json_bytes(doc), VmmPutStateBody) == body


def as_json_bytes(doc: Any) -> bytes:
    import json

    return json.dumps(doc).encode()


def test_ensure_body_example_is_valid_and_decodes(sled_agent_contract: Contract) -> None:
    nic = uuid.uuid4()
    doc = ensure_body_json(nic_ids=[nic])
    sled_agent_contract.validate("InstanceEnsureBody", doc)
    body = decode(as_json_bytes(doc), InstanceEnsureBody)
    assert body.nic_ids == {nic}
    assert body.vmm_runtime.state is VmmState.STARTING


def test_monitor_messages_are_valid(propolis_contract: Contract) -> None:
    propolis_contract.validate(
        "InstanceStateMonitorRequest", as_json(InstanceStateMonitorRequest(3))
    )
    resp = InstanceStateMonitorResponse(
        gen=4,
        state=InstanceState.MIGRATING,
        migration=InstanceMigrateStatusResponse(
            migration_in=None,
            migration_out=InstanceMigrationStatus(uuid.uuid4(), PropolisMigrationState.RAM_PUSH),
        ),
    )
    propolis_contract.validate("InstanceStateMonitorResponse", as_json(resp))
    assert decode(encode(resp), InstanceStateMonitorResponse) == resp


def test_error_and_bundle_metadata_are_valid(sled_agent_contract: Contract) -> None:
    sled_agent_contract.validate(
        "Error", as_json(Error("no such VMM", "req-1", "NO_SUCH_INSTANCE"))
    )
    meta = ZoneBundleMetadata(
        cause=ZoneBundleCause.TERMINATED_INSTANCE,
        id=ZoneBundleId(bundle_id=uuid.uuid4(), zone_name="oxz_propolis-server_x"),
        time_created=NOW,
        version=0,
    )
    sled_agent_contract.validate("ZoneBundleMetadata", as_json(meta))


@pytest.mark.parametrize(
    ("doc", "names"),
    [
        (b'{"state": {"type": "paused"}}', "$.state.type"),
        (b'{"state": {"type": "migration_target"}}', "value"),
        (b'{"state": {"type": "running", "value": {"src_propolis_addr": "x"}}}', "value"),
        (b'{"state": {}}', "type"),
        (b"{not json", "malformed"),
    ],
)
def test_bad_put_state_bodies_are_refused_naming_the_field(doc: bytes, names: str) -> None:
    with pytest.raises(BadRequest, match=r".") as info:
        decode(doc, VmmPutStateBody)
    assert names in str(info.value)


def test_ensure_body_with_bad_uuid_names_the_field() -> None:
    doc = ensure_body_json()
    doc["instance_id"] = "not-a-uuid"
    with pytest.raises(BadRequest) as info:
        decode(as_json_bytes(doc), InstanceEnsureBody)
    assert "$.instance_id" in str(info.value)
