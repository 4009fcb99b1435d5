"""The monitor: follows one Propolis's state stream by generation.

Who starts it: the VMM's runner, in the runner's nursery, once Propolis has a VM.
What it does: long-polls ``state-monitor`` with ``gen`` = last generation + 1, and hands
each answer to the runner (``on_observation``), which applies it to the registry. It
returns when the runner says the VMM halted. Connection failures and 5xx are retried
with backoff (50 ms doubling to 1 s) while the zone exists; a Propolis that has no VM
(410 / ``NoInstance``) or a zone that vanished ends the stream with ``on_gone``.
On cancellation (the runner terminating) it simply stops.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import structlog
import trio

from ._config import BackoffPolicy
from ._errors import PeerError, PropolisGone
from ._host import PropolisClient
from ._wire import InstanceStateMonitorResponse


async def follow_propolis(
    client: PropolisClient,
    *,
    backoff: BackoffPolicy,
    on_observation: Callable[[InstanceStateMonitorResponse], bool],
    on_gone: Callable[[str], None],
    zone_exists: Callable[[], Awaitable[bool]],
    log: structlog.typing.FilteringBoundLogger,
) -> None:
    """Run until the VMM halts (``on_observation`` returns True) or is gone."""
    gen = 0
    delays = backoff.delays()
    while True:
        try:
            response = await client.state_monitor(gen)
        except PropolisGone as exc:
            on_gone(f"Propolis has no VM: {exc}")
            return
        except PeerError as exc:
            if not exc.transient:
                on_gone(f"Propolis refused the state monitor: {exc}")
                return
            if not await zone_exists():
                on_gone("the VMM's zone vanished")
                return
            delay = next(delays)
            log.warning("monitor_retry", error=str(exc), retry_in_s=delay)
            await trio.sleep(delay)
            continue
        delays = backoff.delays()
        if on_observation(response):
            return
        gen = max(gen, response.gen + 1)
