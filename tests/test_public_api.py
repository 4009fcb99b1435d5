"""The curated public namespaces name exactly what they export."""

from __future__ import annotations

import types

import pytest

import sledagent
import sledagent.testing


@pytest.mark.parametrize("module", [sledagent, sledagent.testing])
def test_exported_names_match_all(module: types.ModuleType) -> None:
    public = {
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and not isinstance(value, types.ModuleType)
        and name != "annotations"
    }
    assert public == set(module.__all__)
    assert len(module.__all__) == len(set(module.__all__))


def test_every_exported_name_comes_from_a_private_module() -> None:
    for name in sledagent.__all__:
        origin = getattr(getattr(sledagent, name), "__module__", "sledagent._")
        assert origin.startswith("sledagent._"), (name, origin)
