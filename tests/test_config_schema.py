"""The config schema is read from the attrs classes: any field, nested table or bound
added to them is checked, strictly, with one line naming its key path."""

from __future__ import annotations

import enum
import typing
from pathlib import Path
from typing import Any

import attrs
import pytest
import tomli_w
from attrs import validators as v
from hypothesis import given
from hypothesis import strategies as st

from sledagent._config import AgentConfig, BackoffPolicy, TerminationPolicy
from sledagent._daemon_config import DaemonConfig, config_from_toml, load_config
from sledagent._failures import ConfigError
from sledagent._schema import build, describe, render


@attrs.frozen(kw_only=True)
class Limits:
    max_head_bytes: int = attrs.field(default=16384, validator=v.ge(1024))
    graceful_s: float = attrs.field(default=5.0, validator=v.gt(0))


@attrs.frozen(kw_only=True)
class Top:
    name: str = "x"
    http: Limits = attrs.field(factory=Limits)


def problems(table: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as refused:
        build(Top, table)
    return refused.value.problems


def test_a_nested_table_added_to_a_config_class_is_checked_with_no_extra_code() -> None:
    assert build(Top, {"http": {"graceful_s": 1}}) == Top(http=Limits(graceful_s=1.0))
    assert problems({"http": {"max_head_bytes": "big"}}) == [
        'http.max_head_bytes: expected an integer >= 1024, got "big"'
    ]
    assert problems({"http": {"max_head_bytes": 10, "graceful_s": 0}}) == [
        "http.max_head_bytes: expected an integer >= 1024, got 10",
        "http.graceful_s: expected a number > 0, got 0",
    ]
    assert problems({"http": {"keep_alive": 1}}) == [
        "http.keep_alive: unknown key (known: graceful_s, max_head_bytes)"
    ]
    assert problems({"http": 3, "nmae": "y"}) == [
        "nmae: unknown key (did you mean name?)",
        "http: expected a table with keys max_head_bytes, graceful_s, got 3",
    ]


def _toml_value(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [_toml_value(x) for x in value]
    if attrs.has(type(value)):
        return {f.name: _toml_value(getattr(value, f.name)) for f in attrs.fields(type(value))}
    return value


def test_every_default_written_as_toml_reads_back_the_same() -> None:
    defaults = DaemonConfig()
    doc = {k: v for k, v in _toml_value(defaults).items() if v is not None}
    assert config_from_toml(tomli_w.dumps(doc)) == defaults


HINTS = typing.get_type_hints(AgentConfig)
SCALARS = [f for f in attrs.fields(AgentConfig) if not attrs.has(HINTS[f.name])]
TEXT = st.text(st.characters(blacklist_categories=("Cs",)))
WRONG: dict[Any, st.SearchStrategy[Any]] = {
    int: st.one_of(TEXT, st.booleans(), st.floats(allow_nan=False), st.lists(st.integers())),
    float: st.one_of(TEXT, st.booleans(), st.lists(st.floats(allow_nan=False))),
    bool: st.one_of(st.integers(), TEXT, st.floats(allow_nan=False)),
    TerminationPolicy: st.one_of(
        TEXT.filter(lambda t: t not in ("reaper", "inline")), st.integers()
    ),
}


@given(data=st.data())
def test_a_value_of_the_wrong_type_for_any_agent_key_is_one_line_naming_it(
    data: st.DataObject,
) -> None:
    field = data.draw(st.sampled_from(SCALARS))
    value = data.draw(WRONG[HINTS[field.name]])
    with pytest.raises(ConfigError) as refused:
        config_from_toml(tomli_w.dumps({"agent": {field.name: value}}), source="s.toml")
    expect = describe(HINTS[field.name], field.validator)
    assert refused.value.problems == [
        f"s.toml: agent.{field.name}: expected {expect}, got {render(value)}"
    ]


def test_bounds_are_read_from_the_validators() -> None:
    hints = {f.name: f for f in attrs.fields(AgentConfig)}
    assert describe(int, hints["max_zones"].validator) == "an integer >= 1"
    assert describe(float, hints["stop_grace_s"].validator) == "a number > 0"
    assert describe(int, hints["compression_level"].validator) == "an integer from 0 to 9"
    assert describe(BackoffPolicy) == "a table with keys initial_s, max_s"


def test_flags_override_the_file_and_are_named_when_bad(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('listen = "127.0.0.1:1"\n[agent]\nmax_zones = 2\n')
    cfg = load_config(
        path, flags={"listen": "127.0.0.1:0", "data_dir": tmp_path, "nexus_url": None}
    )
    assert (cfg.listen, cfg.data_dir, cfg.agent.max_zones) == ("127.0.0.1:0", tmp_path, 2)
    with pytest.raises(ConfigError) as refused:
        load_config(path, flags={"nexus_url": "ftp://x"})
    assert refused.value.problems == ['--nexus: expected an http://host:port URL, got "ftp://x"']
