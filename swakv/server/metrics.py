"""Prometheus metrics: a custom registry with a collector over the engine snapshot.

Exported (all token counts are per pool, `pool` = "full" | "swa"):
  swakv_kv_pool_tokens{pool, state}     gauge: state = total | free | used | cached |
                                        cached_evictable | requests (pinned by live requests:
                                        used - cached_evictable)
  swakv_prefix_hit_tokens_total         prompt tokens served from the prefix cache
  swakv_prefix_window_miss_tokens_total full KV cached but the SWA window was missing
  swakv_prefix_full_miss_tokens_total   no full KV cached
  swakv_prefix_lookup_tokens_total      tokens looked up at admission
  swakv_retractions_total               requests retracted under memory pressure
  swakv_host_kv_pool_tokens{pool, state} host tier: state = total | free | used
  swakv_host_{hit,backed_up_*,loaded_*,demoted,evicted_*}_tokens_total  host tier flows
  swakv_num_requests_{waiting,running}  scheduler queue lengths
  swakv_{prompt,generation}_tokens_total, swakv_requests_{finished,aborted,failed}_total
  swakv_request_latency_seconds, swakv_time_to_first_token_seconds,
  swakv_step_time_seconds               histograms
  swakv_http_requests_total{endpoint, status}
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from swakv.server.async_engine import Observer, Snapshot

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

_COUNTERS = {  # snapshot counter -> (metric name without _total, help)
    "prefix_hit_tokens": ("swakv_prefix_hit_tokens", "Prompt tokens served from the prefix cache"),
    "window_miss_tokens": ("swakv_prefix_window_miss_tokens",
                           "Looked-up tokens whose full KV was cached but SWA window was missing"),
    "full_miss_tokens": ("swakv_prefix_full_miss_tokens",
                         "Looked-up tokens with no full KV in the cache"),
    "prefix_lookup_tokens": ("swakv_prefix_lookup_tokens", "Tokens looked up at admission"),
    "retractions": ("swakv_retractions", "Requests retracted (KV freed, requeued)"),
    "prompt_tokens": ("swakv_prompt_tokens", "Prompt tokens of finished requests"),
    "output_tokens": ("swakv_generation_tokens", "Output tokens of finished requests"),
    "finished": ("swakv_requests_finished", "Requests finished (aborted ones included)"),
    "aborted": ("swakv_requests_aborted", "Requests aborted (client gone or shutdown)"),
    "failed": ("swakv_requests_failed",
               "Requests failed by an engine error (their step raised, or they could never run)"),
    "steps": ("swakv_engine_steps", "Engine steps that ran a batch"),
    "host_hit_tokens": ("swakv_host_hit_tokens",
                        "Prompt tokens served by loading a prefix back from the host tier"),
    "backed_up_full_tokens": ("swakv_host_backed_up_full_tokens",
                              "Tokens of full KV copied to the host tier"),
    "backed_up_swa_tokens": ("swakv_host_backed_up_swa_tokens",
                             "Tokens of SWA KV copied to the host tier"),
    "loaded_full_tokens": ("swakv_host_loaded_full_tokens",
                           "Tokens of full KV loaded back from the host tier"),
    "loaded_swa_tokens": ("swakv_host_loaded_swa_tokens",
                          "Tokens of SWA KV loaded back from the host tier (windows only)"),
    "demoted_tokens": ("swakv_host_demoted_tokens",
                       "Tokens whose device KV was freed while their host copy stayed"),
    "host_evicted_full_tokens": ("swakv_host_evicted_full_tokens",
                                 "Tokens of full KV dropped from the host tier"),
    "host_evicted_swa_tokens": ("swakv_host_evicted_swa_tokens",
                                "Tokens of SWA KV dropped from the host tier"),
}


class SnapshotCollector(Collector):
    """Turns the engine thread's latest Snapshot into metric families on each scrape."""

    def __init__(self, get_snapshot: Callable[[], Snapshot]) -> None:
        self.get_snapshot = get_snapshot

    def collect(self) -> Iterator[Metric]:
        s = self.get_snapshot()
        pools = GaugeMetricFamily("swakv_kv_pool_tokens",
                                  "KV pool tokens by pool (full, swa) and state",
                                  labels=["pool", "state"])
        states = {"total": s.total, "free": s.free, "used": s.used, "cached": s.cached,
                  "cached_evictable": s.cached_evictable, "requests": s.used_by_requests}
        for state, need in states.items():
            pools.add_metric(["full", state], need.full)
            pools.add_metric(["swa", state], need.swa)
        yield pools
        host = GaugeMetricFamily("swakv_host_kv_pool_tokens",
                                 "Host KV tier tokens by pool (full, swa) and state (0: off)",
                                 labels=["pool", "state"])
        for state, need in {"total": s.host_total, "free": s.host_free,
                            "used": s.host_total - s.host_free}.items():
            host.add_metric(["full", state], need.full)
            host.add_metric(["swa", state], need.swa)
        yield host
        yield GaugeMetricFamily("swakv_num_requests_waiting", "Requests waiting for admission",
                                value=s.num_waiting)
        yield GaugeMetricFamily("swakv_num_requests_running", "Requests admitted (prefill/decode)",
                                value=s.num_running)
        for key, (name, help_text) in _COUNTERS.items():
            yield CounterMetricFamily(name, help_text, value=s.counters.get(key, 0))


class ServerMetrics(Observer):
    """The registry /metrics serves, and the timing histograms the engine thread feeds."""

    def __init__(self, get_snapshot: Callable[[], Snapshot]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SnapshotCollector(get_snapshot))
        r = self.registry
        self.latency = Histogram("swakv_request_latency_seconds",
                                 "Arrival to last token of finished requests",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("swakv_time_to_first_token_seconds", "Arrival to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.step_time = Histogram("swakv_step_time_seconds", "Wall time of one engine step",
                                   buckets=STEP_BUCKETS, registry=r)
        self.http = Counter("swakv_http_requests", "HTTP requests by endpoint and status",
                            ["endpoint", "status"], registry=r)

    def on_step(self, seconds: float) -> None:
        self.step_time.observe(seconds)

    def on_first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def on_finish(self, seconds: float) -> None:
        self.latency.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
