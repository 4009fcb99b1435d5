"""schemathesis against the served OpenAPI document of a real daemon process (a fixed,
small budget; ``scripts/fuzz-api`` runs a larger one)."""

from __future__ import annotations

import re

import pytest

from .fuzz_api import run_fuzz


@pytest.mark.deadline_s(300)  # a daemon process and schemathesis's phases (~120 s loaded)
def test_schemathesis_finds_no_server_error_and_no_answer_off_the_spec() -> None:
    result = run_fuzz(examples=8, seed=20261123)
    assert result.returncode == 0, result.output[-6000:]
    # Every phase ran, the stateful one included (register -> drive -> read -> unregister).
    for phase in ("Coverage", "Fuzzing", "Stateful"):
        assert re.search(rf"✅ {phase}", result.output), result.output[-3000:]
    assert "Tested: 18" in result.output  # every operation, the quarantine listing included
    assert result.daemon_exit == 0
    assert "api_error" not in result.daemon_log
