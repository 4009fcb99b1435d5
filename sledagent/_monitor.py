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
once per run of such answers: it must not spin the agent or Nexus. So is one that
answers at the generation asked for with nothing Nexus sees changed (a Propolis that
advances its generation on every answer), from the ``QUIET_ANSWERS``-th such answer in a
row: a real Propolis's own invisible steps (``Stopped`` after ``Stopping``) still get
their next poll at once. The backoff ends at the next visible change, whose answer is
never delayed (the poll that brings it is already open).

A 200 whose body is not the contract's (``MalformedAnswer``) is a Propolis fault like an
outage: retried with backoff and the VMM failed after ``unreachable_s``; it never
reaches the runner. Once Propolis has answered generation 2^64 - 1 there is nothing left
to ask for (the request is a u64): the stream ends there, logged
(``propolis_generation_exhausted``); the VMM stays as it is until a stop's grace or an
unregister ends it.
On cancellation (the runner terminating) it simply stops.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Iterator

import structlog
import trio

from ._config import BackoffPolicy
from ._errors import PeerError, PropolisGone
from ._host import PropolisClient
from ._wire import U64_MAX, InstanceStateMonitorResponse

#: Answers in a row that change nothing Nexus sees before the next poll is backed off.
QUIET_ANSWERS = 3


class Seen(enum.Enum):
    """What an observation did to the VMM (``on_observation``'s answer)."""

    #: Nothing Nexus is told changed: nothing published.
    NOTHING = "nothing"
    #: A new state, published.
    CHANGED = "changed"
    #: The VMM halted: the stream ends.
    HALTED = "halted"


async def follow_propolis(
    client: PropolisClient,
    *,
    backoff: BackoffPolicy,
    unreachable_s: float,
    on_observation: Callable[[InstanceStateMonitorResponse], Seen],
    on_gone: Callable[[str], None],
    zone_exists: Callable[[], Awaitable[bool]],
    log: structlog.typing.FilteringBoundLogger,
    seen_live: Callable[[], bool] = lambda: True,
    gen: int = 0,
) -> None:
    """Run until the VMM halts (``on_observation`` returns ``Seen.HALTED``), is gone, or
    Propolis's generations are exhausted; the first long poll asks for generation ``gen``."""
    delays = backoff.delays()
    idle_delays: Iterator[float] | None = None
    quiet = 0  # answers in a row that changed nothing
    failing_since: float | None = None
    while True:
        if gen > U64_MAX:
            log.error("propolis_generation_exhausted", answered_gen=U64_MAX,
                      reason="no later generation can be asked for: monitoring ends")  # fmt: skip
            return
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
        seen = on_observation(response)
        if seen is Seen.HALTED:
            return
        if seen is Seen.CHANGED:
            quiet, idle_delays = 0, None
        else:
            quiet += 1
        if response.gen < gen or quiet >= QUIET_ANSWERS:
            # Answered without waiting for the generation asked for, or keeps answering
            # with nothing to tell: the next poll is backed off.
            if idle_delays is None:
                idle_delays = backoff.delays()
                event = "propolis_answered_early" if response.gen < gen else "propolis_answers_idle"
                log.warning(event, asked_gen=gen, answered_gen=response.gen, quiet=quiet)
            await trio.sleep(next(idle_delays))
        gen = max(gen, response.gen + 1)
