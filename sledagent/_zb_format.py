"""What ``sledagent zone-bundle`` prints, as omicron's ``zone-bundle`` prints it. Pure.

Tables have a header row and columns as wide as their widest cell; ``-p`` (parseable)
prints comma-separated raw values with no header, as omicron's. Sizes are omicron's
``as_human_bytes`` (``1.50 MiB``), percentages its integer ``used * 100 / total``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from ._failures import UsageError

#: ``list -o``: field -> (header, how to read it from a bundle's metadata).
LIST_FIELDS = {
    "zone-name": "Zone",
    "bundle-id": "Bundle ID",
    "time-created": "Created",
    "cause": "Cause",
    "version": "Version",
}
LIST_DEFAULT = ("zone-name", "bundle-id", "time-created")

UTILIZATION_FIELDS = {
    "directory": "Directory",
    "bytes-used": "Bytes used",
    "bytes-available": "Bytes available",
    "dataset-quota": "Dataset quota",
    "pct-available": "% of limit",
    "pct-quota": "% of quota",
}

PRIORITY_DIMENSIONS = ("time", "cause")
PERIOD_RANGE_S = (60, 86_400)
STORAGE_LIMIT_RANGE = (1, 50)


def parse_fields(flag: str, given: Sequence[str] | None, known: Mapping[str, str]) -> list[str]:
    """``-o zone-name,cause`` (or repeated ``-o``) -> the field names, checked."""
    if not given:
        return []
    fields = [f.strip() for item in given for f in item.split(",") if f.strip()]
    unknown = [f for f in fields if f not in known]
    if unknown or not fields:
        shown = json.dumps(",".join(given))
        raise UsageError(f"{flag}: expected a comma list of {', '.join(known)}, got {shown}")
    return fields


def human_bytes(size: int) -> str:
    """omicron's ``as_human_bytes``: ``512 B``, ``1.50 KiB`` ... ``2.00 TiB``."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:0.2f} {unit}"
    return f"{size} B"


def pct(used: int, total: int) -> int | None:
    """``used * 100 / total``, integer (omicron's); ``None`` when ``total`` is 0."""
    return used * 100 // total if total else None


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Aligned columns, a header row first; no trailing spaces."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    return [
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in (header, *rows)
    ]


def _list_value(bundle: Mapping[str, Any], field: str) -> str:
    return str(
        {
            "zone-name": bundle["id"]["zone_name"],
            "bundle-id": bundle["id"]["bundle_id"],
            "time-created": bundle["time_created"],
            "cause": bundle["cause"],
            "version": bundle["version"],
        }[field]
    )


def bundle_lines(
    bundles: Sequence[Mapping[str, Any]], fields: Sequence[str], *, parseable: bool
) -> list[str]:
    """``zone-bundle list``: nothing when there are no bundles (as omicron)."""
    if not bundles:
        return []
    rows = [[_list_value(b, f) for f in fields] for b in bundles]
    if parseable:
        return [",".join(row) for row in rows]
    return table([LIST_FIELDS[f] for f in fields], rows)


def utilization_lines(
    by_dir: Mapping[str, Mapping[str, int]], fields: Sequence[str], *, parseable: bool
) -> list[str]:
    """``zone-bundle utilization``: per debug directory; sizes human unless parseable."""
    rows = []
    for directory, u in by_dir.items():
        used, avail, quota = u["bytes_used"], u["bytes_available"], u["dataset_quota"]
        values: dict[str, Any] = {
            "directory": directory,
            "bytes-used": used,
            "bytes-available": avail,
            "dataset-quota": quota,
            "pct-available": pct(used, avail),
            "pct-quota": pct(used, quota),
        }
        row = []
        for f in fields:
            v = values[f]
            if parseable:
                row.append("" if v is None else str(v))
            elif f.startswith("pct-"):
                row.append("-" if v is None else f"{v}%")
            elif f.startswith(("bytes-", "dataset-")):
                row.append(human_bytes(v))
            else:
                row.append(str(v))
        rows.append(row)
    if not rows:
        return []
    if parseable:
        return [",".join(row) for row in rows]
    return table([UTILIZATION_FIELDS[f] for f in fields], rows)


def cleanup_lines(by_dir: Mapping[str, Mapping[str, int]], *, parseable: bool) -> list[str]:
    """``zone-bundle cleanup``: bundles and bytes removed per debug directory."""
    items = sorted(by_dir.items())
    if parseable:
        return [f"{d},{c['bundles']},{c['bytes']}" for d, c in items]
    if not items:
        return []
    rows = [[d, str(c["bundles"]), human_bytes(c["bytes"])] for d, c in items]
    return table(["Directory", "Count", "Bytes"], rows)


def context_lines(ctx: Mapping[str, Any]) -> list[str]:
    """``zone-bundle cleanup-context``, as omicron's (period, priority, storage limit)."""
    period = ctx["period"]
    secs = period["secs"] + period.get("nanos", 0) / 1e9
    return [
        f"Period: {secs:g}s",
        f"Priority: {', '.join(ctx['priority'])}",
        f"Storage limit: {ctx['storage_limit']}%",
    ]


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """``600`` (seconds, omicron's form), ``600s``, ``10m``, ``1h30m``, ``1d`` -> seconds."""
    t = text.strip().lower()
    if re.fullmatch(r"\d+(?:\.\d+)?", t):
        return float(t)
    if not t or _DURATION.sub("", t):
        raise ValueError(f"not a duration: {text!r}")
    return sum(float(n) * _UNIT_S[u] for n, u in _DURATION.findall(t))


def period_body(text: str) -> dict[str, int]:
    """``--period`` -> the API's ``Duration``, checked against the agent's range."""
    lo, hi = PERIOD_RANGE_S
    try:
        seconds = parse_duration(text)
    except ValueError:
        seconds = -1.0
    if not lo <= seconds <= hi:
        shown = json.dumps(text)
        raise UsageError(
            f"--period: expected a duration from {lo} s to {hi} s (600, 10m, 1h), got {shown}"
        )
    whole = int(seconds)
    return {"secs": whole, "nanos": round((seconds - whole) * 1e9)}


def priority_body(given: Sequence[str]) -> list[str]:
    """``--priority time,cause`` -> the API's list: each dimension once, in order."""
    dims = [d.strip().lower() for item in given for d in item.split(",") if d.strip()]
    if sorted(dims) != sorted(PRIORITY_DIMENSIONS):
        raise UsageError(
            "--priority: expected time,cause or cause,time (each once, most important "
            f"first), got {json.dumps(','.join(given))}"
        )
    return dims


def storage_limit_body(value: int) -> int:
    lo, hi = STORAGE_LIMIT_RANGE
    if not lo <= value <= hi:
        raise UsageError(
            f"--storage-limit: expected a percentage of the quota from {lo} to {hi}, got {value}"
        )
    return value
