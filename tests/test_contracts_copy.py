"""The project's contracts/ must stand alone, and must still equal the shared ones."""

from __future__ import annotations

import pytest

from .conftest import CONTRACTS, ROOT

SHARED = ROOT.parent / "shared" / "contracts"
NAMES = ["sled-agent.json", "nexus-internal.json", "propolis-server.json", "README.md"]


@pytest.mark.parametrize("name", NAMES)
def test_contract_copy_is_present(name: str) -> None:
    assert (CONTRACTS / name).is_file()


@pytest.mark.parametrize("name", NAMES)
def test_contract_copy_equals_shared_contract_when_shared_folder_exists(name: str) -> None:
    if not SHARED.is_dir():
        pytest.skip("no shared/contracts beside this clone")
    assert (CONTRACTS / name).read_bytes() == (SHARED / name).read_bytes(), (
        f"contracts/{name} differs from shared/contracts/{name}: copy it again"
    )
