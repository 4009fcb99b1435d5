"""An httpx transport that honours the agent's overload refusals, as a well-behaved
client of the sled agent does (Nexus, an operator's tools, our demo and tests).

Under overload the agent refuses a state read at once with ``503`` ``OVERLOADED`` and
``Retry-After`` (``_admission``; issue 21) instead of letting it time out. A client that
reads state once and takes a 503 as the answer is wrong on a loaded host (a QA run on a
busy 2-core machine saw exactly that in tests). This transport repeats a ``GET``
refused that way after ``Retry-After`` seconds (RFC 9110 10.2.3), up to ``attempts``
times; any other answer, and every other method, passes through unchanged.
"""

from __future__ import annotations

import httpx
import trio

#: The error code of a refusal worth repeating (``_errors.Overloaded``).
OVERLOADED = "OVERLOADED"


class RetryOverloaded(httpx.AsyncBaseTransport):
    """Wraps ``inner`` (default: a plain ``httpx.AsyncHTTPTransport``)."""

    def __init__(
        self,
        inner: httpx.AsyncBaseTransport | None = None,
        *,
        attempts: int = 30,
        max_wait_s: float = 2.0,
    ) -> None:
        self.inner = inner or httpx.AsyncHTTPTransport()
        self.attempts = attempts
        self.max_wait_s = max_wait_s

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        for _ in range(self.attempts - 1):
            response = await self.inner.handle_async_request(request)
            if request.method != "GET" or not await _overloaded(response):
                return response
            await trio.sleep(_wait_s(response, self.max_wait_s))
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def _overloaded(response: httpx.Response) -> bool:
    if response.status_code != 503 or "retry-after" not in response.headers:
        return False
    await response.aread()
    await response.aclose()
    try:
        return bool(response.json().get("error_code") == OVERLOADED)
    except ValueError:
        return False


def _wait_s(response: httpx.Response, cap: float) -> float:
    try:
        return min(cap, max(0.0, float(response.headers["retry-after"])))
    except ValueError:
        return cap
