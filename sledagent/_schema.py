"""Build attrs config classes from parsed TOML, strictly, with one line per problem.

Generic over the classes: the keys a table may hold, their types and their bounds come
from the attrs fields (names, annotations, validators), so a field added to a config
class is checked with no code here. A field whose type is an attrs class is a TOML table
(``[agent]``, ``nexus_backoff = {initial_s = 1, max_s = 60}``), checked the same way.

Each value is converted by msgspec in strict mode (no coercion: ``"5"`` is not an
integer, ``"yes"`` not a boolean, ``"xy"`` not a list of paths; an integer is a valid
float), then the field's own validators run. Every problem becomes one line naming the
key path, what is allowed and the value given::

    agent.max_zones: expected an integer >= 1, got "many"
    agent.nexus_backoff: expected a table with keys initial_s, max_s, got 3
    agent.max_zone: unknown key (did you mean max_zones?)

Bounds are read from attrs' number validators (``ge``, ``gt``, ``le``, ``lt``, and
``and_``/``optional`` of them). A field whose rule cannot be read from its validators says
it in ``metadata={EXPECT: "..."}``. Checks across fields (``__attrs_post_init__``) run
once every field is valid; their message is prefixed with the table's path.
"""

from __future__ import annotations

import datetime as dt
import difflib
import enum
import json
import types
import typing
from collections.abc import Callable, Mapping
from functools import cache
from pathlib import Path
from typing import Any, TypeVar, cast

import attrs
import msgspec

from ._failures import ConfigError

T = TypeVar("T")

#: attrs field metadata key: what the field accepts, when its validators cannot say.
EXPECT = "sledagent.expect"

_MAX_SHOWN = 80


def build(
    cls: type[T], table: Mapping[str, Any], *, label: Callable[[str], str] | None = None
) -> T:
    """``cls`` from a parsed TOML table; ``ConfigError`` with every problem found.

    ``label`` renders a key path for messages (e.g. a flag's name for a value given on
    the command line); by default the dotted path itself."""
    problems: list[str] = []
    built = _build(cls, table, "", problems, label or (lambda path: path))
    if problems or built is None:
        raise ConfigError(*problems)
    return built


def _build(
    cls: type[T],
    table: Mapping[str, Any],
    prefix: str,
    problems: list[str],
    label: Callable[[str], str],
) -> T | None:
    fields = {f.name: f for f in attrs.fields(cls) if f.init}  # type: ignore[arg-type]
    hints = _hints(cast(Any, cls))  # classes are hashable; type[T] does not say so
    count = len(problems)
    for key in table:
        if key not in fields:
            problems.append(f"{label(prefix + key)}: unknown key{_suggest(key, fields)}")
    kwargs: dict[str, Any] = {}
    for name, field in fields.items():
        if name not in table:
            continue
        path, value, tp = prefix + name, table[name], hints[name]
        nested = _attrs_class(tp)
        if nested is not None:
            if not isinstance(value, dict):
                problems.append(f"{label(path)}: expected {describe(tp)}, got {render(value)}")
                continue
            built = _build(nested, value, f"{path}.", problems, label)
            if built is not None:
                kwargs[name] = built
            continue
        try:
            converted = msgspec.convert(value, tp, strict=True, dec_hook=_dec_hook)
            if field.validator is not None:
                field.validator(None, field, converted)
        except (msgspec.ValidationError, ValueError, TypeError):
            expect = field.metadata.get(EXPECT) or describe(tp, field.validator)
            problems.append(f"{label(path)}: expected {expect}, got {render(value)}")
            continue
        kwargs[name] = converted
    if len(problems) > count:
        return None
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:  # a rule across fields (__attrs_post_init__)
        head = label(prefix.rstrip("."))
        problems.append(f"{head}: {exc}" if head else str(exc))
        return None


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _suggest(key: str, fields: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(key, list(fields), n=1)
    if close:
        return f" (did you mean {close[0]}?)"
    return f" (known: {', '.join(sorted(fields))})"


def _dec_hook(tp: Any, obj: Any) -> Any:
    if tp is Path:
        if isinstance(obj, str) and obj:
            return Path(obj)
        raise TypeError("expected a non-empty path")
    raise NotImplementedError(f"no conversion to {tp!r}")


def _optional_inner(tp: Any) -> Any:
    """``X | None`` -> ``X`` (TOML has no null: the key is simply left out)."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _attrs_class(tp: Any) -> type | None:
    inner = _optional_inner(tp)
    return inner if isinstance(inner, type) and attrs.has(inner) else None


_NAMES: dict[Any, tuple[str, str]] = {
    bool: ("true or false", "booleans"),
    int: ("an integer", "integers"),
    float: ("a number", "numbers"),
    str: ("a string", "strings"),
    Path: ("a path", "paths"),
}


def describe(tp: Any, validator: Any = None) -> str:
    """What a field of type ``tp`` accepts, in words: ``an integer >= 1``."""
    tp = _optional_inner(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        text = "one of " + ", ".join(json.dumps(a) for a in args)
    elif isinstance(tp, type) and issubclass(tp, enum.Enum):
        text = "one of " + ", ".join(json.dumps(m.value) for m in tp)
    elif origin in (tuple, list, set, frozenset) and args:
        item = _optional_inner(args[0])
        text = "a list of " + _NAMES.get(item, ("", "values"))[1]
    elif isinstance(tp, type) and attrs.has(tp):
        names = [f.name for f in attrs.fields(tp) if f.init]
        text = "a table" + (" with keys " + ", ".join(names) if len(names) <= 4 else "")
    elif origin is dict or tp is dict:
        text = "a table"
    else:
        text = _NAMES.get(tp, (getattr(tp, "__name__", str(tp)), ""))[0]
    bounds = _bounds(validator)
    if len(bounds) == 2 and bounds[0][0] == ">=" and bounds[1][0] == "<=":
        return f"{text} from {bounds[0][1]} to {bounds[1][1]}"
    shown = " and ".join(f"{op} {bound}" for op, bound in bounds)
    return f"{text} {shown}" if shown else text


def _bounds(validator: Any) -> list[tuple[str, str]]:
    """``(">=", "1")`` bounds from attrs' number validators (and ``and_``/``optional``)."""
    if validator is None:
        return []
    if hasattr(validator, "bound") and hasattr(validator, "compare_op"):
        return [(validator.compare_op, f"{validator.bound:g}")]
    inner = getattr(validator, "_validators", None) or getattr(validator, "validators", None)
    if inner is not None:
        return [b for v in inner for b in _bounds(v)]
    if hasattr(validator, "validator"):  # optional(...)
        return _bounds(validator.validator)
    return []


def render(value: Any) -> str:
    """A value as it is written in TOML (strings quoted), shortened if long."""
    text = _render(value)
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."


def _render(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_render(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_render(v)}" for k, v in value.items()) + "}"
    return repr(value)
