"""Flag types shared by the commands: an empty value is refused where it is given.

``--data-dir ''`` would otherwise be ``Path('')``, which is ``.``: the command would
quietly use the working directory (the config file's ``data_dir = ""`` is refused by
the schema; a flag must be too). Exit status 2, one line:
``Invalid value for --data-dir: expected a non-empty path``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import cyclopts
from cyclopts import validators as cv


def non_empty_path(hint: Any, tokens: Sequence[cyclopts.Token]) -> Path:
    """cyclopts converter: the token as a ``Path``, ``ValueError`` if it is blank."""
    value = tokens[0].value
    if not value.strip():
        raise ValueError("expected a non-empty path")
    return Path(value)


def _non_empty_text(what: str) -> Any:
    def convert(hint: Any, tokens: Sequence[cyclopts.Token]) -> str:
        value = tokens[0].value
        if not value.strip():
            raise ValueError(f"expected a non-empty {what}")
        return value

    return convert


#: A path flag (``--data-dir``, ``--output``...); ``PathOrNone`` when it may be left out.
PathFlag = Annotated[Path, cyclopts.Parameter(converter=non_empty_path)]
PathOrNone = Annotated[Path | None, cyclopts.Parameter(converter=non_empty_path)]
#: ``--host``; a zone's name (an argument: cyclopts names no argument, so the message does).
HostOrNone = Annotated[str | None, cyclopts.Parameter(converter=_non_empty_text("host"))]
ZoneName = Annotated[str, cyclopts.Parameter(converter=_non_empty_text("zone name (ZONE_NAME)"))]

#: Benchmark parameters: checked as flags (exit 2, one line naming the flag), before
#: anything runs.
Count = Annotated[int, cyclopts.Parameter(validator=cv.Number(gte=1))]
CountOrNone = Annotated[int | None, cyclopts.Parameter(validator=cv.Number(gte=1))]
AtLeastZero = Annotated[int, cyclopts.Parameter(validator=cv.Number(gte=0))]
NonNegative = Annotated[float, cyclopts.Parameter(validator=cv.Number(gte=0))]
NonNegativeOrNone = Annotated[float | None, cyclopts.Parameter(validator=cv.Number(gte=0))]
Positive = Annotated[float, cyclopts.Parameter(validator=cv.Number(gt=0))]
Counts = Annotated[
    tuple[int, ...], cyclopts.Parameter(consume_multiple=True, validator=cv.Number(gte=1))
]
NonNegatives = Annotated[
    tuple[float, ...], cyclopts.Parameter(consume_multiple=True, validator=cv.Number(gte=0))
]
Positives = Annotated[
    tuple[float, ...], cyclopts.Parameter(consume_multiple=True, validator=cv.Number(gt=0))
]
