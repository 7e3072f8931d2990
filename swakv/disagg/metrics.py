"""PD metrics: a snapshot the engine thread refreshes, exported to Prometheus.

Exported by both roles (`role` label = prefill | decode):
  swakv_pd_transfer_bytes_total{pool, direction}   KV bytes moved per pool: "sent" (the
                                                   prefill side's backend counters) or
                                                   "received" (the decode side, from
                                                   each landed request's plan)
  swakv_pd_transfers_total{result}                 ok | failed transfers (requests)
  swakv_pd_transfer_latency_seconds                prefill: write() to completion;
  swakv_pd_kv_wait_seconds                         decode: Prealloc sent to KVWritten
  swakv_pd_prealloc_queue_length                   decode: requests waiting for pages
  swakv_pd_inflight_requests                       decode: preallocated, KV not landed;
                                                   prefill: computing or transferring
  swakv_pd_inflight_requests_peak                  most at once since start
  swakv_pd_budget_tokens{pool}                     decode: free + evictable minus what
                                                   running and preallocated requests
                                                   may still take (may be negative)
  swakv_pd_peers                                   connected peers (handshake done)
  swakv_pd_host_copies_total, swakv_pd_restores_total   decode: retractions saved to
                                                   host memory, and restored
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from swakv.memory.pages import Need

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
                   60, 120)


@dataclass(frozen=True)
class PDStats:
    role: str
    num_peers: int = 0
    num_queued: int = 0
    num_inflight: int = 0
    peak_inflight: int = 0
    budget: Need = Need()
    bytes_sent: Need = Need()  # bytes per pool (full, swa), not tokens
    bytes_received: Need = Need()
    num_transfers_ok: int = 0
    num_transfers_failed: int = 0
    num_host_copies: int = 0
    num_restores: int = 0


class PDCollector(Collector):
    def __init__(self, get_stats: Callable[[], PDStats]) -> None:
        self.get_stats = get_stats

    def collect(self) -> Iterator[Metric]:
        s = self.get_stats()
        role = [s.role]
        moved = CounterMetricFamily("swakv_pd_transfer_bytes", "KV bytes moved between PD "
                                    "workers, per pool and direction",
                                    labels=["role", "pool", "direction"])
        for direction, need in (("sent", s.bytes_sent), ("received", s.bytes_received)):
            moved.add_metric([s.role, "full", direction], need.full)
            moved.add_metric([s.role, "swa", direction], need.swa)
        yield moved
        done = CounterMetricFamily("swakv_pd_transfers", "Request KV transfers by result",
                                   labels=["role", "result"])
        done.add_metric([s.role, "ok"], s.num_transfers_ok)
        done.add_metric([s.role, "failed"], s.num_transfers_failed)
        yield done
        gauges = (
            ("swakv_pd_prealloc_queue_length", "Requests waiting for destination pages",
             s.num_queued),
            ("swakv_pd_inflight_requests", "PD requests holding KV that has not moved yet",
             s.num_inflight),
            ("swakv_pd_inflight_requests_peak", "Most in-flight PD requests at once",
             s.peak_inflight),
            ("swakv_pd_peers", "Connected PD peers", s.num_peers),
        )
        for name, help_text, value in gauges:
            g = GaugeMetricFamily(name, help_text, labels=["role"])
            g.add_metric(role, value)
            yield g
        budget = GaugeMetricFamily("swakv_pd_budget_tokens", "Decode preallocation budget "
                                   "per pool (tokens)", labels=["role", "pool"])
        budget.add_metric([s.role, "full"], s.budget.full)
        budget.add_metric([s.role, "swa"], s.budget.swa)
        yield budget
        for name, help_text, value in (
                ("swakv_pd_host_copies", "Retractions saved to host memory", s.num_host_copies),
                ("swakv_pd_restores", "Retracted requests restored from host copies",
                 s.num_restores)):
            c = CounterMetricFamily(name, help_text, labels=["role"])
            c.add_metric(role, value)
            yield c


class PDMetrics:
    """The histograms the engine thread observes, and the collector over its stats."""

    def __init__(self, get_stats: Callable[[], PDStats],
                 registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(
            auto_describe=False)
        self.registry.register(PDCollector(get_stats))
        self.transfer_latency = Histogram(
            "swakv_pd_transfer_latency_seconds", "Prefill side: KV write to completion",
            buckets=LATENCY_BUCKETS, registry=self.registry)
        self.kv_wait = Histogram(
            "swakv_pd_kv_wait_seconds", "Decode side: preallocation sent to KV landed",
            buckets=LATENCY_BUCKETS, registry=self.registry)
