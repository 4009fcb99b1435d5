"""Shared test helpers.

Determinism rules (as in trio-websocket's suite): timed behaviour runs under
``autojump_clock`` (virtual time; the fakes sleep, they never use threads); any test that
does real I/O carries a ``trio.fail_after``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

ROOT = Path(__file__).resolve().parent.parent
CONTRACTS = ROOT / "contracts"


def _openapi_to_jsonschema(node: Any) -> Any:
    """OpenAPI 3.0 ``nullable: true`` means "this schema, or null"; JSON Schema has no
    such keyword, so rewrite it (contracts/README.md)."""
    if isinstance(node, list):
        return [_openapi_to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _openapi_to_jsonschema(v) for k, v in node.items() if k != "nullable"}
    if node.get("nullable") is True:
        return {"anyOf": [out, {"type": "null"}]}
    return out


class Contract:
    """One contract document, able to validate an instance against a named schema."""

    def __init__(self, name: str) -> None:
        self.document = json.loads((CONTRACTS / name).read_text())
        self._root = _openapi_to_jsonschema(self.document)

    def validate_response(self, method: str, path: str, status: int, body: Any) -> None:
        """Validate a response body against the operation's declared response."""
        op = self.document["paths"][path][method.lower()]
        key = str(status) if str(status) in op["responses"] else f"{str(status)[0]}XX"
        response = op["responses"][key]
        if "$ref" in response:  # the shared Error response
            response = self.document["components"]["responses"][response["$ref"].split("/")[-1]]
        content = response.get("content")
        if content is None:
            assert body in (None, b"", ""), f"{method} {path} {status}: expected no body"
            return
        schema = next(iter(content.values()))["schema"]
        full = {**self._root, **_openapi_to_jsonschema(schema)}
        jsonschema.Draft202012Validator(
            full, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
        ).validate(body)

    def validate(self, schema_name: str, instance: Any) -> None:
        assert schema_name in self.document["components"]["schemas"], schema_name
        schema = {**self._root, "$ref": f"#/components/schemas/{schema_name}"}
        jsonschema.Draft202012Validator(
            schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
        ).validate(instance)


@pytest.fixture(scope="session")
def sled_agent_contract() -> Contract:
    return Contract("sled-agent.json")


@pytest.fixture(scope="session")
def nexus_contract() -> Contract:
    return Contract("nexus-internal.json")


@pytest.fixture(scope="session")
def propolis_contract() -> Contract:
    return Contract("propolis-server.json")


@pytest.fixture(autouse=True)
def _stop_sim_hosts(request: pytest.FixtureRequest) -> Any:
    """The daemon's simulated guests outlive it by design (``sim/_spawn.py``): once a
    test is over, stop every sim host it left under its ``tmp_path``."""
    if "tmp_path" not in request.fixturenames:
        yield
        return
    root = request.getfixturevalue("tmp_path")  # set up first: torn down after us
    yield
    from sledagent.sim._spawn import read_state

    for state in Path(root).rglob("sim-host.json"):
        host = read_state(state.parent)
        if host is not None:
            host.kill()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Kill zone processes a failed test left running (they are detached daemons): those
    under this session's own temporary directory only (another session on the same
    machine may be running its own)."""
    import os
    import signal
    from pathlib import Path

    try:
        basetemp = str(session.config._tmp_path_factory.getbasetemp()).encode()  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        ours = b"_logwriter" in cmdline or (b"sledagent._cli" in cmdline and b"sim-host" in cmdline)
        if ours and basetemp in cmdline:
            try:
                os.killpg(int(proc.name), signal.SIGKILL)
            except OSError:
                pass
