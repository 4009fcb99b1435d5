"""Small statistics helpers: percentiles for benchmark reports, histograms for metrics."""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

import attrs


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def summary(values: Sequence[float], *, digits: int = 6) -> dict[str, float]:
    return {
        "p50": round(percentile(values, 50), digits),
        "p99": round(percentile(values, 99), digits),
        "max": round(max(values, default=0.0), digits),
    }


#: ``sledagent_halt_to_publish_seconds`` buckets. docs/performance.md: the reaper publishes
#: at p99 0.07-0.5 s (N=200, fake host / HTTP) and 1.7-2.9 s at N=1000; omicron's behaviour
#: 4-112 s; Nexus gives up on a sled-agent request after 60 s.
HALT_TO_PUBLISH_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
#: ``sledagent_zone_held_seconds`` buckets. docs/performance.md: phase 1 p99 0.1-0.5 s at
#: 50 MB per zone (target <= 2 s); a hung command costs its timeout (30 s by default).
ZONE_HELD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)


@attrs.frozen
class HistogramSnapshot:
    """Cumulative counts since start: ``buckets`` pairs each upper bound with the number
    of observations <= it (the last bound is +Inf, equal to ``count``)."""

    buckets: tuple[tuple[float, int], ...]
    count: int
    sum: float


class Histogram:
    """A Prometheus-style histogram: fixed upper bounds, counts only grow (a ``rate()``
    over it is valid, unlike quantiles of a recent window). ``observe`` is a bisect and
    two additions."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(sorted(float(b) for b in bounds))
        self._counts = [0] * (len(self.bounds) + 1)  # the last: above every bound
        self._sum = 0.0
        #: Another process's counts of the same histogram (``absorb``), added to ours.
        self._elsewhere: tuple[list[int], float] | None = None

    def observe(self, value: float) -> None:
        self._counts[bisect.bisect_left(self.bounds, value)] += 1
        self._sum += value

    def raw(self) -> tuple[list[int], float]:
        """This process's own counts per bucket (the last: above every bound) and sum."""
        return list(self._counts), self._sum

    def absorb(self, counts: list[int], total: float) -> None:
        """Count in another process's ``raw()`` (cumulative: replaces its last one).
        Counts of another shape are ignored (a histogram with other bounds)."""
        if len(counts) == len(self._counts):
            self._elsewhere = (list(counts), total)

    def snapshot(self) -> HistogramSnapshot:
        counts, total = self._counts, self._sum
        if self._elsewhere is not None:
            counts = [a + b for a, b in zip(counts, self._elsewhere[0], strict=True)]
            total += self._elsewhere[1]
        cumulative, running = [], 0
        for bound, n in zip((*self.bounds, math.inf), counts, strict=True):
            running += n
            cumulative.append((bound, running))
        return HistogramSnapshot(tuple(cumulative), running, total)
