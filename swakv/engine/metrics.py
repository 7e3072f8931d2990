"""Engine counters and the pool-usage snapshot the server exports."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from swakv.memory.pages import Need
from swakv.sched.request import Request


@dataclass
class EngineMetrics:
    """Monotonic counters plus a window of recent step and request timings (seconds)."""

    num_steps: int = 0
    num_scheduled_tokens: int = 0
    num_finished: int = 0
    num_aborted: int = 0
    num_failed: int = 0
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    step_times: deque = field(default_factory=lambda: deque(maxlen=1024))
    latencies: deque = field(default_factory=lambda: deque(maxlen=1024))
    ttfts: deque = field(default_factory=lambda: deque(maxlen=1024))

    def on_step(self, num_tokens: int, seconds: float) -> None:
        self.num_steps += 1
        self.num_scheduled_tokens += num_tokens
        self.step_times.append(seconds)

    def on_finish(self, req: Request) -> None:
        self.num_finished += 1
        reason = req.finish_reason.value if req.finish_reason is not None else None
        self.num_aborted += reason == "abort"
        self.num_failed += reason == "error"
        self.num_prompt_tokens += req.num_prompt_tokens
        self.num_output_tokens += req.num_output_tokens
        if req.finish_time is not None:
            self.latencies.append(req.finish_time - req.arrival_time)
        if req.first_token_time is not None:
            self.ttfts.append(req.first_token_time - req.arrival_time)


@dataclass(frozen=True)
class EngineSnapshot:
    """Pool usage (tokens per pool), queue lengths and counters at one moment.

    `cached` is what the prefix cache holds (evictable or pinned by a lock);
    `used_by_requests` is what live requests pin: their own pages plus the tree pages
    their locks protect, i.e. used minus what eviction could free (0 when idle).
    """

    total: Need = Need()
    free: Need = Need()
    cached: Need = Need()
    cached_evictable: Need = Need()
    num_waiting: int = 0
    num_running: int = 0
    counters: dict[str, int] = field(default_factory=dict)
    host_total: Need = Need()  # host tier pools (0 when off)
    host_free: Need = Need()

    @property
    def used(self) -> Need:
        return self.total - self.free

    @property
    def used_by_requests(self) -> Need:
        return (self.used - self.cached_evictable).clamp_min(0)
