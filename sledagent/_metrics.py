"""Prometheus metrics, read from the agent's statistics at scrape time.

Nothing is counted on the hot paths: the collector asks each component for its
``statistics()`` when ``/metrics`` is scraped. What to alert on is in docs/operations.md.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ._admission import ReadAdmission
from ._agent import SledAgent
from ._http import STATS as HTTP_STATS
from ._registry import VmmPhase
from ._stats import Histogram


def _histogram(name: str, doc: str, histogram: Histogram) -> HistogramMetricFamily:
    """Cumulative buckets since start (``promtool check metrics`` accepts a histogram;
    a gauge with a ``quantile`` label it does not)."""
    snap = histogram.snapshot()
    buckets = [("+Inf" if b == float("inf") else f"{b:g}", n) for b, n in snap.buckets]
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=snap.sum)


class AgentCollector(Collector):
    def __init__(self, agent: SledAgent) -> None:
        self._agent = agent

    def collect(self) -> Iterator[Metric]:
        agent = self._agent
        vmms = GaugeMetricFamily("sledagent_vmms", "Registered VMMs by phase.", labels=["phase"])
        for phase in VmmPhase:
            vmms.add_metric([phase.value], agent.manager.registry.count(phase))
        yield vmms
        yield GaugeMetricFamily(
            "sledagent_vmms_readopting",
            "VMMs taken back after a restart whose Propolis has not answered yet.",
            value=agent.manager.readopting(),
        )

        b = agent.bundler.statistics()
        slots = GaugeMetricFamily(
            "sledagent_bundle_slots", "Bundle limiter slots.", labels=["phase", "kind"]
        )
        for stage, s in (("collect", b.collect), ("archive", b.archive)):
            slots.add_metric([stage, "borrowed"], s.borrowed)
            slots.add_metric([stage, "total"], s.total)
            slots.add_metric([stage, "waiting"], s.waiting)
        yield slots
        yield CounterMetricFamily("sledagent_bundles_created", "Bundles written.", value=b.created)
        yield CounterMetricFamily(
            "sledagent_bundles_failed", "Bundle attempts failed.", value=b.failed
        )
        yield CounterMetricFamily(
            "sledagent_bundle_archive_busy_seconds",
            "Phase-2 slot-seconds spent writing archives.",
            value=b.archive_busy_s,
        )
        yield CounterMetricFamily(
            "sledagent_bundle_archive_input_bytes",
            "Log bytes taken into archives.",
            value=b.archive_input_bytes,
        )
        yield _histogram(
            "sledagent_zone_held_seconds",
            "Phase 1 duration of each bundle (its zone held).",
            agent.bundler.zone_held,
        )

        st = agent.store.statistics()
        files = GaugeMetricFamily(
            "sledagent_bundle_quarantine_files",
            "Files in a debug directory's quarantine (not whole bundles), as of the last scan.",
            labels=["debug_dir"],
        )
        size = GaugeMetricFamily(
            "sledagent_bundle_quarantine_bytes",
            "Bytes in a debug directory's quarantine, as of the last scan.",
            labels=["debug_dir"],
        )
        for d, count in st.quarantine_files.items():
            files.add_metric([d], count)
            size.add_metric([d], st.quarantine_bytes.get(d, 0))
        yield files
        yield size
        yield CounterMetricFamily(
            "sledagent_bundles_quarantined",
            "Files moved to quarantine since start (unreadable, truncated...).",
            value=st.quarantined,
        )
        unreadable = GaugeMetricFamily(
            "sledagent_bundle_unreadable_dirs",
            "Directories under a debug directory that cannot be listed: their files are "
            "neither counted nor moved (listed with the quarantine), as of the last scan.",
            labels=["debug_dir"],
        )
        for d, count in st.unreadable_dirs.items():
            unreadable.add_metric([d], count)
        yield unreadable
        yield CounterMetricFamily(
            "sledagent_bundle_stale_temp_files_removed",
            "Temporary bundle files no archive of this agent was writing, removed by scans.",
            value=st.stale_temp_files_removed,
        )

        r = agent.reaper.statistics()
        yield GaugeMetricFamily("sledagent_reaper_zones", "Defunct zones held.", value=r.held)
        yield CounterMetricFamily("sledagent_reaper_reaped", "Zones torn down.", value=r.reaped)
        yield CounterMetricFamily(
            "sledagent_reaper_bundles_abandoned",
            "Zones torn down without a bundle.",
            value=r.bundles_failed,
        )
        yield CounterMetricFamily(
            "sledagent_reaper_halt_retries", "Zone halts retried.", value=r.halt_retries
        )

        n = agent.notifier.statistics()
        yield GaugeMetricFamily(
            "sledagent_nexus_pending", "VMMs with an undelivered state.", value=n.pending
        )
        yield GaugeMetricFamily(
            "sledagent_nexus_in_flight", "Requests to Nexus in flight.", value=n.in_flight
        )
        yield CounterMetricFamily(
            "sledagent_nexus_delivered", "States acknowledged.", value=n.delivered
        )
        yield CounterMetricFamily("sledagent_nexus_retries", "Deliveries retried.", value=n.retries)
        yield CounterMetricFamily(
            "sledagent_nexus_refused", "States refused (4xx).", value=n.gave_up
        )
        yield CounterMetricFamily(
            "sledagent_nexus_superseded", "States replaced by newer.", value=n.superseded
        )
        yield _histogram(
            "sledagent_halt_to_publish_seconds",
            "Terminal state recorded -> acknowledged by Nexus.",
            agent.manager.halt_to_publish,
        )


class HttpCollector(Collector):
    """The HTTP servers of this process (``_http.STATS``): what they turned away."""

    def collect(self) -> Iterator[Metric]:
        s = HTTP_STATS.with_elsewhere()
        yield GaugeMetricFamily(
            "sledagent_http_connections", "Open server connections.", value=s.connections_open
        )
        errors = CounterMetricFamily(
            "sledagent_http_accept_errors", "accept(2) failures, by errno.", labels=["errno"]
        )
        for name, count in sorted(s.accept_errors.items()):
            errors.add_metric([name], count)
        yield errors
        yield CounterMetricFamily(
            "sledagent_http_idle_closed",
            "Idle connections closed to make room (connection cap, descriptors).",
            value=s.idle_closed,
        )
        refused = CounterMetricFamily(
            "sledagent_http_refused",
            "Answers the server gave itself (bad framing, timeouts, caps), by status.",
            labels=["status"],
        )
        for status, count in sorted(s.refused.items()):
            refused.add_metric([str(status)], count)
        yield refused
        abandoned = CounterMetricFamily(
            "sledagent_http_abandoned",
            "Requests their client left (closed or reset) before sending them whole, by "
            "stage (head, body); nothing was answered.",
            labels=["stage"],
        )
        for stage, count in sorted(s.abandoned.items()):
            abandoned.add_metric([stage], count)
        yield abandoned


def metrics_text(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


class ReadsCollector(Collector):
    """State reads served and refused (``_admission.ReadAdmission``)."""

    def __init__(self, admission: ReadAdmission) -> None:
        self._admission = admission

    def collect(self) -> Iterator[Metric]:
        stats = self._admission.statistics()
        yield CounterMetricFamily(
            "sledagent_reads_admitted", "VMM-state reads served.", value=stats.admitted
        )
        shed = CounterMetricFamily(
            "sledagent_reads_shed",
            "VMM-state reads refused at once with 503 and Retry-After, by reason "
            "(publication_first: halts were being published and the thread lagged; "
            "late: the read waited past its bound).",
            labels=["reason"],
        )
        for reason, count in stats.shed.items():
            shed.add_metric([reason], count)
        yield shed
        yield _histogram(
            "sledagent_read_wait_seconds",
            "How long each VMM-state read waited for the agent's thread (its estimated "
            "queueing before it was answered or refused).",
            self._admission.waited,
        )
        yield GaugeMetricFamily(
            "sledagent_publications_under_way",
            "Monitor answers and states on their way to Nexus (not those backing off).",
            value=self._admission.backlog(),
        )


def registry_for(agent: SledAgent, admission: ReadAdmission | None = None) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(agent))
    registry.register(HttpCollector())
    if admission is not None:
        registry.register(ReadsCollector(admission))
    return registry
