"""The agent's configuration: one object, validated once, passed down.

Every field has a default that suits a real host; tests shorten the timings. Values are
checked when the object is built (attrs validators), so a bad config fails at start with
a message naming the field, never later in a runner.
"""

from __future__ import annotations

import enum
import os
from typing import Any

import attrs
from attrs import validators as v


class TerminationPolicy(enum.StrEnum):
    """How a halted VMM is published and its zone torn down.

    ``reaper`` (the default): publish at once, hand the zone to the reaper.
    ``inline``: omicron's behaviour, kept only as a measured baseline: the runner
    bundles (under one host-wide lock) and tears down before it publishes.
    """

    REAPER = "reaper"
    INLINE = "inline"


# attrs' number validators, not closures: the config schema reads their bounds to say
# what a key accepts (``agent.max_zones: expected an integer >= 1, got 0``).
_positive = v.gt(0.0)


def _at_least(minimum: int) -> Any:
    return v.ge(minimum)


@attrs.frozen(kw_only=True)
class BackoffPolicy:
    """Exponential backoff: ``initial_s`` doubling up to ``max_s``."""

    initial_s: float = attrs.field(default=0.25, validator=_positive)
    max_s: float = attrs.field(default=180.0, validator=_positive)

    def __attrs_post_init__(self) -> None:
        if self.max_s < self.initial_s:
            raise ValueError(f"max_s ({self.max_s:g}) must be >= initial_s ({self.initial_s:g})")

    def delays(self) -> Any:
        """An endless iterator of delays: initial, 2x, 4x, ... capped at max."""
        delay = self.initial_s
        while True:
            yield delay
            delay = min(delay * 2, self.max_s)


@attrs.frozen(kw_only=True)
class AgentConfig:
    """Everything the core needs to know; see docs/operations.md for the reference."""

    def __attrs_post_init__(self) -> None:
        if self.archive_max_slots < self.bundle_archive_concurrency:
            raise ValueError(
                f"bundle_archive_max_concurrency ({self.bundle_archive_max_concurrency}) "
                f"must be >= bundle_archive_concurrency ({self.bundle_archive_concurrency})"
            )

    @property
    def archive_max_slots(self) -> int:
        """Phase-2 slots for small bundles (and archive worker processes)."""
        if self.bundle_archive_max_concurrency == 0:
            return 2 * self.bundle_archive_concurrency
        return self.bundle_archive_max_concurrency

    termination_policy: TerminationPolicy = attrs.field(
        default=TerminationPolicy.REAPER, converter=TerminationPolicy
    )
    #: Zones this sled may hold at once (live VMMs plus defunct zones being reaped).
    max_zones: int = attrs.field(default=1024, validator=_at_least(1))
    #: Requests queued per VMM runner before callers get INSTANCE_CHANNEL_FULL.
    runner_queue_size: int = attrs.field(default=64, validator=_at_least(1))
    #: After a requested stop, how long Propolis has to reach Destroyed (omicron: 10 min).
    stop_grace_s: float = attrs.field(default=600.0, validator=_positive)
    #: How long a new VMM waits for a previous incarnation's zone to release its NICs.
    nic_release_timeout_s: float = attrs.field(default=30.0, validator=_positive)
    #: Nexus deliveries: 250 ms doubling to 3 min (omicron's).
    nexus_backoff: BackoffPolicy = attrs.field(factory=BackoffPolicy)
    #: Nexus deliveries in flight at once, over all VMMs (omicron does not bound them).
    #: A mass stop of N VMMs needs about N / this many round trips; over HTTP each
    #: delivery also costs the agent's thread CPU, and more in flight only lengthens the
    #: run queue that API requests wait in (N=200 over HTTP: 256 -> 64 took GET state
    #: p99 from ~150 ms to ~90 ms, publishing no slower). A slow Nexus wants more: at
    #: 200 ms per update, 64 publish 100 VMMs in under a second (docs/performance.md).
    nexus_concurrency: int = attrs.field(default=64, validator=_at_least(1))
    #: Propolis state-monitor retries: 50 ms doubling to 1 s (omicron's).
    monitor_backoff: BackoffPolicy = attrs.field(
        factory=lambda: BackoffPolicy(initial_s=0.05, max_s=1.0)
    )
    #: A Propolis whose state monitor has failed (refused, dropped, 5xx) for this long
    #: without one answer is taken for dead: the VMM fails and is reaped. Shorter
    #: outages are ridden out.
    propolis_unreachable_s: float = attrs.field(default=60.0, validator=_positive)
    #: After an agent restart, how long a re-adopted VMM's Propolis has to answer its
    #: first state-monitor question before the VMM is re-adopted anyway (the monitor
    #: then keeps asking, up to ``propolis_unreachable_s``).
    readopt_probe_s: float = attrs.field(default=5.0, validator=_positive)
    #: A migration target whose Propolis has not reported the migration under way this
    #: long after it was asked to migrate in (its source never answered) is failed, and
    #: its zone reaped. Propolis's own target has no such deadline and omicron waits
    #: for Nexus's saga to unwind; a longer RAM transfer is not limited by it (only the
    #: wait for the source's first answer is). docs/design.md, "Live migration".
    migration_source_timeout_s: float = attrs.field(default=60.0, validator=_positive)
    #: After an agent restart, how long a state change for a VMM still being re-adopted
    #: waits for it before the caller gets 503 (retry).
    readopt_wait_s: float = attrs.field(default=10.0, validator=_positive)
    #: Bundles holding their zone (commands + snapshot) at once.
    bundle_collect_concurrency: int = attrs.field(default=8, validator=_at_least(1))
    #: Bundles archiving at once (phase 2); default: the number of cores.
    bundle_archive_concurrency: int = attrs.field(
        factory=lambda: os.cpu_count() or 1, validator=_at_least(1)
    )
    #: Beyond ``bundle_archive_concurrency``, bundles archive at once up to this many
    #: while the bytes being archived (logs and command outputs, all of them together)
    #: stay within ``bundle_archive_small_bytes``: a small bundle's archive is mostly
    #: fixed cost that is not CPU (docs/performance.md, "Session 10"). Default: twice
    #: ``bundle_archive_concurrency`` (0); equal to it: a fixed count.
    bundle_archive_max_concurrency: int = attrs.field(default=0, validator=_at_least(0))
    bundle_archive_small_bytes: int = attrs.field(default=16 << 20, validator=v.ge(0))
    #: Each zone command's own timeout; a timeout is recorded and the rest kept.
    command_timeout_s: float = attrs.field(default=30.0, validator=_positive)
    #: How long dropping a snapshot may take during cleanup (shielded).
    snapshot_cleanup_timeout_s: float = attrs.field(default=60.0, validator=_positive)
    #: Reaper step retries (bundle, halt): backoff between attempts.
    reaper_backoff: BackoffPolicy = attrs.field(
        factory=lambda: BackoffPolicy(initial_s=1.0, max_s=60.0)
    )
    #: Before bundling a defunct zone, wait up to this long while Nexus deliveries are
    #: under way (terminal states first; bundling competes with them for CPU). Deliveries
    #: backing off (Nexus down) do not hold bundling back. 0: do not wait.
    publish_first_s: float = attrs.field(default=10.0, validator=v.ge(0))
    #: Bundle defunct zones before teardown (off only to measure the floor of a benchmark).
    bundle_defunct_zones: bool = True
    #: Bundle attempts before the reaper gives up on a zone's bundle and tears it down.
    bundle_attempts: int = attrs.field(default=3, validator=_at_least(1))
    #: Zone teardowns running at once.
    teardown_concurrency: int = attrs.field(default=16, validator=_at_least(1))
    #: On shutdown, how long the reaper may keep working (shielded) before it stops.
    shutdown_drain_s: float = attrs.field(default=30.0, validator=_positive)
    #: gzip level of bundles: 0..3 with python-isal (fast); 4..9 with stdlib zlib (omicron
    #: uses 9; about 25x slower here: for the inline baseline's "as omicron" run).
    compression_level: int = attrs.field(default=2, validator=v.and_(v.ge(0), v.le(9)))
