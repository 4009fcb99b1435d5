"""The monitor: follows one Propolis's state stream by generation.

Who starts it: the VMM's runner, in the runner's nursery, once Propolis has a VM.
What it does: long-polls ``state-monitor`` with ``gen`` = last generation + 1, and hands
each answer to the runner (``on_observation``), which applies it to the registry. It
returns when the runner says the VMM halted. Connection failures and 5xx are retried
with backoff (50 ms doubling to 1 s) while the zone exists, for at most
``unreachable_s`` without an answer; a Propolis that has no VM (410 / ``NoInstance``)
once the VM has been seen live (before, Propolis may still be creating it: that is
retried like an outage), one unreachable for longer (its process died), one that
refuses the monitor for good (another 4xx) or a zone that vanished ends the stream with
``on_gone``. A Propolis that answers without waiting (a generation below the one asked
for: a mock, a buggy or restarted Propolis) is polled with the same backoff, and logged
once per run of such answers: it must not spin the agent or Nexus.
On cancellation (the runner terminating) it simply stops.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator

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
    unreachable_s: float,
    on_observation: Callable[[InstanceStateMonitorResponse], bool],
    on_gone: Callable[[str], None],
    zone_exists: Callable[[], Awaitable[bool]],
    log: structlog.typing.FilteringBoundLogger,
    seen_live: Callable[[], bool] = lambda: True,
    gen: int = 0,
) -> None:
    """Run until the VMM halts (``on_observation`` returns True) or is gone; the first
    long poll asks for generation ``gen``."""
    delays = backoff.delays()
    early_delays: Iterator[float] | None = None
    failing_since: float | None = None
    while True:
        try:
            response = await client.state_monitor(gen)
        except PropolisGone as exc:
            if seen_live():
                on_gone(f"Propolis has no VM: {exc}")
                return
            error: PeerError | None = exc  # not created yet: ride it out like an outage
        except PeerError as exc:
            if not exc.transient:
                on_gone(f"Propolis refused the state monitor: {exc}")
                return
            error = exc
        else:
            error = None
        if error is not None:
            if not await zone_exists():
                on_gone("the VMM's zone vanished")
                return
            now = trio.current_time()
            failing_since = now if failing_since is None else failing_since
            if now - failing_since >= unreachable_s:
                on_gone(f"Propolis unreachable for {now - failing_since:.0f} s: {error}")
                return
            delay = next(delays)
            log.warning("monitor_retry", error=str(error), retry_in_s=delay)
            await trio.sleep(delay)
            continue
        delays, failing_since = backoff.delays(), None
        if on_observation(response):
            return
        if response.gen < gen:
            # Answered without waiting for the generation asked for.
            if early_delays is None:
                early_delays = backoff.delays()
                log.warning("propolis_answered_early", asked_gen=gen, answered_gen=response.gen)
            await trio.sleep(next(early_delays))
        else:
            early_delays = None
        gen = max(gen, response.gen + 1)
