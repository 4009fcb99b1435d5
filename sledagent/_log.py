"""structlog setup: JSON lines for a daemon, readable console lines in a terminal."""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

import structlog


def wants_colour(stream: TextIO) -> bool:
    """Colour only on a terminal, and not when ``$NO_COLOR`` is set (no-color.org: to
    any non-empty value): escapes in a file or a pipe are noise."""
    return stream.isatty() and not os.environ.get("NO_COLOR")


#: How this process's logging was last configured (``json``, ``level``): a child process
#: of the agent's (the front process) logs the same way.
SETTINGS: dict[str, object] = {"json": None, "level": "info"}


def configure_logging(*, json: bool | None = None, level: str = "info") -> None:
    """Configure structlog once for the process.

    ``json=None`` picks JSON when stderr is not a terminal (a daemon under a supervisor)
    and the console renderer otherwise. Loggers bind ``propolis_id``/``zone_name``.
    """
    if json is None:
        json = not sys.stderr.isatty()
    SETTINGS.update(json=json, level=level)
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=wants_colour(sys.stderr))
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info
            if json
            else structlog.processors.StackInfoRenderer(),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
