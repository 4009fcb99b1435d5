"""JSON encoding and strict decoding of the wire models, with msgspec.

One encoder and one decoder per type are built once and reused: building them is the
expensive part, and the Nexus notifier encodes a ``SledVmmState`` on every delivery.
"""

from __future__ import annotations

import re
from functools import cache
from typing import Any, TypeVar

import msgspec

from ._errors import BadRequest
from ._wire import VmmStateRequested

T = TypeVar("T")

_encoder = msgspec.json.Encoder()

#: The u64 validator's refusal (``_wire.u64``): it runs on the object, so msgspec names
#: the object's path; the field is moved into the path as msgspec does for its own checks.
_U64_REFUSAL = re.compile(
    r"^`(?P<field>\w+)` (?P<what>must be a u64 .*?)(?: - at `\$(?P<at>.*)`)?$"
)


def _field_path(message: str) -> str:
    """msgspec's message with a u64 refusal's field in its path (``$.vmm_runtime.gen``)."""
    found = _U64_REFUSAL.match(message)
    if found is None:
        return message
    return f"`{found['field']}` {found['what']} - at `${found['at'] or ''}.{found['field']}`"


def encode(obj: Any) -> bytes:
    """Encode a wire model (or a builtin structure of them) as JSON bytes."""
    if isinstance(obj, VmmStateRequested) and obj.value is None:
        return _encoder.encode({"type": obj.type.value})
    return _encoder.encode(obj)


def to_builtins(obj: Any) -> Any:
    """The JSON-compatible builtin form of a model (dicts, lists, strings, numbers)."""
    if isinstance(obj, VmmStateRequested) and obj.value is None:
        return {"type": obj.type.value}
    return msgspec.to_builtins(obj)


@cache
def _decoder(tp: Any) -> msgspec.json.Decoder[Any]:  # tp: a type, hashable
    return msgspec.json.Decoder(tp)


def decode(data: bytes | str, tp: type[T]) -> T:
    """Decode and validate JSON into ``tp``.

    Raises ``BadRequest`` naming the failing field (msgspec's ``at `$.path` `` suffix)
    for malformed JSON, a missing field, a wrong type or an invalid value.
    """
    try:
        tp_key: Any = tp  # types are hashable; typeshed's type[T] does not say so
        decoded: T = _decoder(tp_key).decode(data)
        return decoded
    except msgspec.ValidationError as exc:
        raise BadRequest(f"invalid body: {_field_path(str(exc))}") from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"malformed JSON: {exc}") from None


def convert(obj: Any, tp: type[T]) -> T:
    """Validate builtin data (e.g. parsed TOML) into ``tp``; ``BadRequest`` on failure."""
    try:
        return msgspec.convert(obj, tp)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"invalid value: {_field_path(str(exc))}") from None
