"""The trace simulator: the real scheduler, radix cache and allocators, no model.

`Simulator` builds an `EngineCore` with a `SimExecutor` (no KV tensors, a simulated
clock), feeds it a `Trace` at the trace's arrival times, and records per-request
timings, pool usage over time and the engine's counters. Every decision (admission,
chunking, frontier advances, eviction, retraction, commits) is made by the same code
that serves requests: only the forward pass is replaced.

Integrity: `check_integrity` (O(pool)) runs every `integrity_every` steps and at the
end; at the end the pools must be at baseline (nothing pinned; every device page free
after the cache is flushed, and with a host tier every host page free after the host
copies are evicted too).
"""

from __future__ import annotations

import dataclasses
import heapq
import time
from dataclasses import dataclass, field

import torch

from swakv.bench.report import percentile as bench_percentile
from swakv.config import EngineConfig, KVLayout, ModelSpec
from swakv.engine.core import EngineCore, InvalidRequest, PromptTooLong, StepOutput
from swakv.memory.pages import Need
from swakv.sampling_params import SamplingParams
from swakv.sched.cost import CostModel
from swakv.sched.request import FinishReason
from swakv.sched.sizing import PoolSizes, size_pools
from swakv.sim.executor import SimClock, SimExecutor, TokenOnlyTokenizer
from swakv.sim.host import simulated_host_tier
from swakv.sim.steptime import StepTimeModel
from swakv.sim.trace import Trace, turn_tokens


class SimulationError(RuntimeError):
    """The simulated engine broke an invariant (integrity check or baseline)."""


@dataclass
class Timeline:
    """Per-step samples (simulated seconds at the end of the step; tokens per pool)."""

    t: list[float] = field(default_factory=list)
    full_used: list[int] = field(default_factory=list)
    swa_used: list[int] = field(default_factory=list)
    full_pinned: list[int] = field(default_factory=list)  # used minus evictable cache
    swa_pinned: list[int] = field(default_factory=list)
    running: list[int] = field(default_factory=list)
    waiting: list[int] = field(default_factory=list)
    output_tokens: list[int] = field(default_factory=list)  # cumulative
    retractions: list[int] = field(default_factory=list)  # cumulative

    def sample(self, now: float, core: EngineCore, output_tokens: int) -> None:
        total, free = core.allocator.total(), core.allocator.available()
        evictable = core.cache.evictable()
        used = total - free
        self.t.append(now)
        self.full_used.append(used.full)
        self.swa_used.append(used.swa)
        self.full_pinned.append(used.full - evictable.full)
        self.swa_pinned.append(used.swa - evictable.swa)
        self.running.append(len(core.scheduler.running))
        self.waiting.append(len(core.scheduler.waiting))
        self.output_tokens.append(output_tokens)
        self.retractions.append(core.scheduler.counters.num_retractions)

    def downsampled(self, max_points: int) -> dict[str, list]:
        """Every k-th sample (and the last) so that at most ~max_points remain."""
        n = len(self.t)
        step = max(1, -(-n // max(1, max_points)))
        keep = list(range(0, n, step))
        if n and keep[-1] != n - 1:
            keep.append(n - 1)
        return {k: [getattr(self, k)[i] for i in keep] for k in self.__dataclass_fields__}


@dataclass
class RequestRecord:
    arrival: float
    num_prompt_tokens: int
    first_token: float | None = None
    finish: float | None = None
    num_output_tokens: int = 0
    cached_prompt_tokens: int = 0
    reason: str | None = None


def percentile(values: list[float], q: float) -> float:
    """`swakv.bench.report.percentile` (nearest rank) with q in [0, 1]; 0 for no values."""
    return bench_percentile(values, q * 100) if values else 0.0


@dataclass
class SimReport:
    trace: str
    model: str
    pools: dict
    step_time: dict
    num_requests: int
    num_finished: int
    num_refused: int
    num_failed: int
    duration_s: float
    prompt_tokens: int
    output_tokens: int
    output_tok_s: float
    total_tok_s: float
    ttft_s: dict
    latency_s: dict
    prefix_hit_ratio: float
    peak_used: dict
    peak_pinned: dict
    retractions: int
    peak_waiting: int  # most requests queued at once
    num_steps: int
    integrity_checks: int
    at_baseline: bool
    wall_s: float
    host: dict = field(default_factory=dict)
    timeline: dict = field(default_factory=dict)


class Simulator:
    """A simulated engine for `spec` (see the module docstring)."""

    def __init__(self, spec: ModelSpec, cfg: EngineConfig, step_time: StepTimeModel,
                 sizes: PoolSizes | None = None, integrity_every: int = 5000,
                 name: str | None = None, kv_dtype: torch.dtype | None = None) -> None:
        """`kv_dtype` (default `cfg.torch_dtype`) sizes the pools: fp8 KV halves bf16's
        bytes per token. Without `sizes`, the pools are `size_pools` of the budget for the
        engine's context limit (`cfg.max_context`, else the model's)."""
        if integrity_every < 0:
            raise ValueError("integrity_every must be >= 0")
        self.spec, self.cfg, self.name = spec, cfg, name or spec.arch
        self.layout = KVLayout.from_model(spec, kv_dtype or cfg.torch_dtype)
        if sizes is None:
            cost = CostModel(spec.window, cfg.page_size, cfg.chunk_size, cfg.decode_reserve,
                             cfg.frontier_stride)
            sizes = size_pools(self.layout, cfg, cost,
                               max_context=cfg.max_context or spec.max_position_embeddings)
        self.clock = SimClock()
        self.executor = SimExecutor(spec, step_time, self.clock)
        host_setting = cfg.host_kv_memory
        if host_setting is not None and not cfg.enable_prefix_cache:
            raise ValueError("a host KV tier needs the prefix cache")
        self.core = EngineCore(spec, None, TokenOnlyTokenizer(),
                               dataclasses.replace(cfg, host_kv_memory=None), sizes=sizes,
                               executor=self.executor)
        if host_setting is not None:
            simulated_host_tier(self.core, host_setting, cfg.host_backup_threshold, self.layout)
        self.integrity_every = integrity_every
        self.integrity_checks = 0
        self.timeline = Timeline()
        self.records: dict[str, RequestRecord] = {}
        self.num_refused = 0
        self._output_tokens = 0

    def check_integrity(self) -> None:
        """`EngineCore.check_integrity` of the engine (it has no KV pools), counted."""
        self.core.check_integrity()
        self.integrity_checks += 1

    def run(self, trace: Trace) -> SimReport:
        wall0 = time.perf_counter()
        core, clock = self.core, self.clock
        vocab = self.spec.vocab_size
        # (arrival, order, session index, turn index, conversation so far)
        pending: list[tuple[float, int, int, int, list[int]]] = [
            (s.arrival, i, i, 0, []) for i, s in enumerate(trace.sessions)]
        heapq.heapify(pending)
        order = len(pending)
        turn_of: dict[str, tuple[int, int]] = {}  # live request -> (session, turn)
        while pending or core.has_unfinished():
            if not core.has_unfinished() and pending[0][0] > clock.now:
                clock.now = pending[0][0]
            while pending and pending[0][0] <= clock.now:
                _, _, si, ti, convo = heapq.heappop(pending)
                turn = trace.sessions[si].turns[ti]
                request_id = f"s{si}-t{ti}"
                if self._add(request_id, convo + turn_tokens(turn, vocab, trace.seed), turn):
                    turn_of[request_id] = (si, ti)
            for out in core.step():
                nxt = self._handle(out)
                if nxt is None:
                    continue
                si, ti = turn_of.pop(out.request.request_id)
                turns = trace.sessions[si].turns
                if ti + 1 < len(turns):
                    heapq.heappush(pending, (clock.now + turns[ti + 1].think_time, order,
                                             si, ti + 1, nxt))
                    order += 1
            self.timeline.sample(clock.now, core, self._output_tokens)
            if self.integrity_every and self.executor.num_steps % self.integrity_every == 0:
                self.check_integrity()
        self.check_integrity()
        host_at_end = self.core.cache.host_usage() if self._host_tier() else None
        at_baseline = self._check_baseline()
        return self._report(trace, time.perf_counter() - wall0, at_baseline, host_at_end)

    # ---- per request ----------------------------------------------------------------
    def _add(self, request_id: str, prompt: list[int], turn) -> bool:
        """Submit one turn; False if the engine refused it (the session ends there)."""
        params = SamplingParams(temperature=0, max_tokens=turn.output_len, ignore_eos=True)
        try:
            self.core.add_request(prompt, params, request_id=request_id)
        except (PromptTooLong, InvalidRequest):
            self.num_refused += 1  # a server answers 400
            return False
        self.records[request_id] = RequestRecord(self.clock.now, len(prompt))
        return True

    def _handle(self, out: StepOutput) -> list[int] | None:
        """Account one output; returns the conversation (prompt + outputs) when the
        request finished normally (its session may continue), else None."""
        req, rec = out.request, self.records[out.request.request_id]
        if out.new_token_ids:
            self._output_tokens += len(out.new_token_ids)
            if rec.first_token is None:
                rec.first_token = self.clock.now
        if not out.finished:
            return None
        rec.finish = self.clock.now
        rec.num_output_tokens = req.num_output_tokens
        rec.cached_prompt_tokens = req.cached_prompt_tokens
        rec.reason = req.finish_reason.value if req.finish_reason else None
        convo = req.token_ids
        self.core.release(req.request_id)
        self.executor.forget(req.request_id)
        if req.finish_reason in (FinishReason.ERROR, FinishReason.ABORT):
            return None
        return convo

    def _host_tier(self) -> bool:
        return getattr(self.core.cache, "host", None) is not None  # a HiCache

    def _check_baseline(self) -> bool:
        """Nothing pinned once idle, every device page free after flushing the cache and
        every host page free after evicting the host copies (SimulationError if not)."""
        core = self.core
        snap = core.snapshot()
        if not snap.used_by_requests.is_zero():
            raise SimulationError(f"idle engine still pins {snap.used_by_requests}")
        core.flush_cache()
        self.check_integrity()
        if core.allocator.available() != core.allocator.total():
            raise SimulationError(f"pages leaked: free {core.allocator.available()} of "
                                  f"{core.allocator.total()} after flushing the cache")
        if self._host_tier():
            host = core.cache.host.pool
            core.cache.tree.evict_host(Need(host.num_full_pages, host.num_swa_pages))
            self.check_integrity()
            if host.available() != host.total():
                raise SimulationError(f"host pages leaked: free {host.available()} of "
                                      f"{host.total()} after evicting the host copies")
        return True

    # ---- report ---------------------------------------------------------------------
    def _report(self, trace: Trace, wall: float, at_baseline: bool,
                host_at_end: tuple[Need, Need] | None) -> SimReport:
        """`host_at_end`: (total, free) host tokens when the trace ended (before the
        baseline check empties the host tier)."""
        core, recs = self.core, list(self.records.values())
        done = [r for r in recs if r.reason in ("length", "stop")]
        failed = [r for r in recs if r.reason == "error"]
        start = min((r.arrival for r in recs), default=0.0)
        end = max((r.finish for r in recs if r.finish is not None), default=start)
        duration = max(end - start, 1e-12)
        prompt = sum(r.num_prompt_tokens for r in done)
        output = sum(r.num_output_tokens for r in done)
        hits = sum(r.cached_prompt_tokens for r in done)
        ttft = [r.first_token - r.arrival for r in done if r.first_token is not None]
        lat = [r.finish - r.arrival for r in done]
        tl = self.timeline
        fb, sb = self.layout.bytes_per_token(False), self.layout.bytes_per_token(True)
        sizes = core.sizes
        host = {}
        if host_at_end is not None:
            total, free = host_at_end
            copier = core.cache.host.copier
            host = {"total_tokens": _need(total), "free_tokens_at_end": _need(free),
                    **core.cache.host_counters(), **copier.counters.__dict__}
        return SimReport(
            trace=trace.name, model=self.name,
            pools={"page_size": sizes.page_size, "full_tokens": sizes.full_tokens,
                   "swa_tokens": sizes.swa_tokens, "full_bytes": sizes.full_bytes,
                   "swa_bytes": sizes.swa_bytes, "chunk_size": core.cost.chunk_size,
                   "max_running_requests": self.cfg.max_running_requests},
            step_time={"a": self.executor.step_time.a, "b": self.executor.step_time.b,
                       "c": self.executor.step_time.c, "source": self.executor.step_time.source},
            num_requests=trace.num_requests, num_finished=len(done),
            num_refused=self.num_refused, num_failed=len(failed),
            duration_s=duration, prompt_tokens=prompt, output_tokens=output,
            output_tok_s=output / duration, total_tok_s=(prompt + output) / duration,
            ttft_s=_pcts(ttft), latency_s=_pcts(lat),
            prefix_hit_ratio=hits / max(1, prompt),
            peak_used={"full_tokens": max(tl.full_used, default=0),
                       "swa_tokens": max(tl.swa_used, default=0),
                       "full_bytes": max(tl.full_used, default=0) * fb,
                       "swa_bytes": max(tl.swa_used, default=0) * sb},
            peak_pinned={"full_tokens": max(tl.full_pinned, default=0),
                         "swa_tokens": max(tl.swa_pinned, default=0)},
            retractions=core.scheduler.counters.num_retractions,
            peak_waiting=max(tl.waiting, default=0),
            num_steps=self.executor.num_steps, integrity_checks=self.integrity_checks,
            at_baseline=at_baseline, wall_s=wall, host=host,
            timeline=self.timeline.downsampled(1000),
        )


def _pcts(xs: list[float]) -> dict[str, float]:
    return {"p50": percentile(xs, 0.5), "p90": percentile(xs, 0.9), "p99": percentile(xs, 0.99),
            "mean": sum(xs) / len(xs) if xs else 0.0}


def _need(n: Need) -> dict[str, int]:
    return {"full": n.full, "swa": n.swa}
