"""Retry helper shared by the reaper's steps and the inline baseline."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog
import trio

from ._config import BackoffPolicy

T = TypeVar("T")


async def retry(
    step: Callable[[], Awaitable[T]],
    *,
    backoff: BackoffPolicy,
    attempts: int | None,
    log: structlog.typing.FilteringBoundLogger,
    event: str,
    on_error: Callable[[int, Exception], None] | None = None,
) -> T:
    """Await ``step()`` until it succeeds, sleeping with ``backoff`` between attempts.

    ``attempts=None`` retries forever (until cancelled). Otherwise the last error is
    raised after ``attempts`` failures. Cancellation is never swallowed.
    """
    delays = backoff.delays()
    attempt = 0
    while True:
        attempt += 1
        try:
            return await step()
        except Exception as exc:
            if on_error is not None:
                on_error(attempt, exc)
            if attempts is not None and attempt >= attempts:
                raise
            delay = next(delays)
            log.warning(event, attempt=attempt, error=repr(exc), retry_in_s=delay)
            await trio.sleep(delay)
