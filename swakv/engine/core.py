"""EngineCore: one plain object driven by `step()`; owns the pools, the cache, the
scheduler, the model runner and the sampler. The server and `LLM` hold one; nothing
subclasses it. Not thread-safe: one thread calls `add_request`, `abort` and `step`.

Containment (DESIGN §10): everything a client sends is validated in `add_request`
(typed `InvalidRequest` naming the parameter). An exception raised while stepping
fails only the requests of that step (each gets a finished StepOutput with `error`),
their KV is released, and `check_integrity()` runs; only a failed integrity check
raises (`EngineCorrupted`), and then the engine must not be used any more.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from swakv.cache import ChunkCache, HiCache, PrefixCache
from swakv.cache.tree_host import HostTier
from swakv.config import EngineConfig, KVLayout, ModelSpec
from swakv.engine.executor import ExecuteResult, Executor, ModelExecutor
from swakv.engine.metrics import EngineMetrics, EngineSnapshot
from swakv.engine.output import OutputText
from swakv.engine.runner import ModelRunner
from swakv.memory.allocator.swa import SWAAllocator
from swakv.memory.copy_engine import CopyEngine
from swakv.memory.host_pool import HostKVPool, host_pool_sizes
from swakv.memory.kv_pool import KVPool
from swakv.memory.pages import Need, page_ceil, page_floor
from swakv.memory.req_table import ReqTable
from swakv.model.sampler import Sampler, make_generator
from swakv.sampling_params import SamplingParams
from swakv.sched.cost import CostModel
from swakv.sched.request import FinishReason, Lifecycle, Request
from swakv.sched.scheduler import Dropped, ScheduledItem, Scheduler
from swakv.sched.sizing import (
    PoolSizes,
    PoolTooSmall,
    capacity_line,
    kv_budget_bytes,
    size_pools,
)

log = logging.getLogger("swakv.engine")


class PromptTooLong(ValueError):
    """A prompt that can never be served: longer than the model context or the full pool."""

    def __init__(self, num_prompt_tokens: int, max_context: int, model_limit: int, full_pool: int):
        super().__init__(
            f"prompt has {num_prompt_tokens} tokens but at most {max_context - 1} fit "
            f"(model context {model_limit} tokens, full KV pool {full_pool} tokens; "
            "one position is kept for the first output token)"
        )
        self.num_prompt_tokens = num_prompt_tokens
        self.max_context = max_context


class InvalidRequest(ValueError):
    """A request the engine refuses at submission; `param` names the bad parameter."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class EmptyPrompt(InvalidRequest):
    """A prompt with no tokens."""

    def __init__(self, message: str = "prompt must contain at least one token") -> None:
        super().__init__(message, "prompt")


class EngineCorrupted(RuntimeError):
    """`check_integrity()` failed after a step error: the KV bookkeeping is broken and
    the engine must stop (every waiting client is answered at once)."""


@dataclass(frozen=True)
class StepOutput:
    """What one step produced for one request.

    `error` is set (and `finished` True) when the request failed: its step raised, or
    it could never be scheduled.
    """

    request: Request
    new_token_ids: list[int]
    delta_text: str
    finished: bool
    logprobs: tuple | None = None  # TokenLogprobs per new token when params.logprobs is set
    error: str | None = None


def effective_chunk_size(cfg: EngineConfig, window: int | None, swa_tokens: int) -> int:
    """Largest chunk c <= cfg.chunk_size whose prefill need `swa_prefill(c)` fits the SWA pool.

    swa_prefill(c) = page_ceil(W - 1 + c) + P + page_ceil(S) <= swa_tokens
    <=> c <= page_floor(swa_tokens - P - page_ceil(S)) - (W - 1).
    Example: W 8, P 4, S 4, 40 SWA tokens -> page_floor(32) - 7 = 25.
    """
    if window is None:
        return cfg.chunk_size
    p = cfg.page_size
    room = page_floor(swa_tokens - p - page_ceil(cfg.frontier_stride, p), p) - (window - 1)
    if room < 1:
        raise PoolTooSmall(f"SWA pool of {swa_tokens} tokens cannot hold one window of {window}")
    return min(cfg.chunk_size, room)


class EngineCore:
    """`model` runs through a ModelExecutor over real KV pools; pass `executor` instead
    (and no model) to run the same scheduler, cache and bookkeeping with another
    executor (the simulator): then no KV tensors are allocated."""

    def __init__(self, spec: ModelSpec, model: torch.nn.Module | None, tokenizer,
                 cfg: EngineConfig, sizes: PoolSizes | None = None,
                 executor: Executor | None = None) -> None:
        self.spec, self.tokenizer, self.cfg = spec, tokenizer, cfg
        window, p = spec.window, cfg.page_size
        layout = KVLayout.from_model(spec, cfg.torch_dtype)
        base_cost = CostModel(window, p, cfg.chunk_size, cfg.decode_reserve, cfg.frontier_stride)
        self.sizes = sizes or size_pools(layout, cfg, base_cost)
        chunk = effective_chunk_size(cfg, window, self.sizes.swa_tokens)
        self.cost = CostModel(window, p, chunk, cfg.decode_reserve, cfg.frontier_stride)
        self.allocator = SWAAllocator(self.sizes.num_full_pages, self.sizes.num_swa_pages, p)
        self.kv_pool = KVPool(layout, self.allocator) if executor is None else None
        self.model_limit = cfg.max_context or spec.max_position_embeddings
        self.max_context = min(self.model_limit, self.sizes.full_tokens)
        self.req_table = ReqTable(cfg.max_running_requests, self.max_context)
        self.cache = self._make_cache(layout)
        self.sampler = Sampler()
        self.scheduler = Scheduler(self.cost, self.cache, cfg.max_running_requests)
        self.eos_ids = frozenset(spec.eos_token_ids) | frozenset(getattr(tokenizer, "eos_ids", ()))
        self.runner: ModelRunner | None = None
        if executor is None:
            if model is None:
                raise ValueError("EngineCore needs a model or an executor")
            assert self.kv_pool is not None
            self.runner = ModelRunner(model, self.kv_pool, self.req_table)
            executor = ModelExecutor(self.runner, self.sampler, self.eos_ids)
        self.executor = executor
        self.requests: dict[str, Request] = {}
        self._texts: dict[str, OutputText] = {}
        self.metrics = EngineMetrics()
        log.info(capacity_line(self.sizes, self.cost))

    def _make_cache(self, layout: KVLayout):
        """ChunkCache, PrefixCache, or HiCache when a host tier is configured."""
        cfg, p, window = self.cfg, self.cfg.page_size, self.spec.window
        if not cfg.enable_prefix_cache:
            return ChunkCache(self.allocator, self.req_table, p, window)
        host_sizes = host_pool_sizes(layout, self.sizes, cfg.host_kv_memory,
                                     device_budget_bytes=kv_budget_bytes(cfg.kv_memory))
        if host_sizes is None:
            return PrefixCache(self.allocator, self.req_table, p, window)
        if self.kv_pool is None:
            raise ValueError("a host KV tier needs KV pools (not available to this executor)")
        host_pool = HostKVPool(layout, host_sizes, device=self.kv_pool.device)
        tier = HostTier(host_pool, CopyEngine(self.kv_pool, host_pool), cfg.host_backup_threshold)
        gib = 1 << 30
        log.info("host KV tier: full %.2f GiB (%d tokens), SWA %.2f GiB (%d tokens)",
                 host_sizes.full_bytes / gib, host_sizes.full_tokens,
                 host_sizes.swa_bytes / gib, host_sizes.swa_tokens)
        return HiCache(self.allocator, self.req_table, p, window, tier)

    # ---- submission -----------------------------------------------------------------
    def validate_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise InvalidRequest / PromptTooLong if the request can never be served.

        Side-effect free, so a caller with several requests validates all first and
        adds none when one is bad. Token ids (prompt, stop_token_ids) must lie in
        [0, vocab_size); a negative id would silently index the wrong token.
        """
        if not prompt_ids:
            raise EmptyPrompt()
        if len(prompt_ids) >= self.max_context:
            raise PromptTooLong(len(prompt_ids), self.max_context, self.model_limit,
                                self.sizes.full_tokens)
        vocab = self.spec.vocab_size
        for param, ids in (("prompt", prompt_ids), ("stop_token_ids", params.stop_token_ids)):
            bad = [t for t in ids if not (isinstance(t, int) and 0 <= t < vocab)]
            if bad:
                raise InvalidRequest(f"{param}: token ids must be integers in [0, {vocab}); "
                                     f"got {bad[:5]}", param)

    def add_request(self, prompt_ids: list[int], params: SamplingParams,
                    request_id: str | None = None) -> Request:
        """Validate and queue a request; raises InvalidRequest / PromptTooLong at once."""
        req = self.register_request(prompt_ids, params, request_id)
        self.scheduler.add(req)
        return req

    def register_request(self, prompt_ids: list[int], params: SamplingParams,
                         request_id: str | None = None) -> Request:
        """`add_request` without queueing it: the request is known (abort, release,
        output text) but not scheduled; PD decode gives it KV from outside and starts
        it with `add_decoding`."""
        self.validate_request(prompt_ids, params)
        if request_id is not None and request_id in self.requests:
            raise InvalidRequest(f"duplicate request id {request_id}", "request_id")
        req = Request(list(prompt_ids), params, self.max_context, arrival_time=time.monotonic(),
                      generator=make_generator(params))
        if request_id is not None:
            req.request_id = request_id
        self.requests[req.request_id] = req
        self._texts[req.request_id] = OutputText(self.tokenizer, params, self.eos_ids)
        return req

    def add_decoding(self, req: Request, first_token_id: int) -> StepOutput:
        """Start decoding a registered request whose prompt KV is in place (PD decode).

        `req.kv` covers `[0, L)` with `kv_len == L == len(req.token_ids)` (written from
        outside); `first_token_id` was sampled elsewhere (the prefill worker). The token
        is accounted like a sampled one; unless it ends the request, the request joins
        the running batch and decodes from position L.
        """
        kv = req.kv
        if req.is_finished or kv is None or kv.kv_len != len(req.token_ids) or req.output_ids:
            raise InvalidRequest(f"request {req.request_id} has no complete prompt KV to "
                                 "decode from", "request_id")
        if not 0 <= first_token_id < self.spec.vocab_size:
            raise InvalidRequest(f"first token {first_token_id} outside the vocabulary",
                                 "first_token_id")
        req.token_ids.append(first_token_id)
        if req.first_token_time is None:
            req.first_token_time = time.monotonic()
        text = self._texts[req.request_id]
        reason = text.add_token(first_token_id, req.num_output_tokens, req.max_new_tokens == 0)
        req.lifecycle = Lifecycle.RUNNING
        self.scheduler.running.append(req)
        if reason is not None:
            self.scheduler.finish(req)
            self._finish(req, reason)
        return StepOutput(req, [first_token_id], text.take_delta(reason is not None),
                          reason is not None)

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its KV; False if it is unknown or already done."""
        req = self.requests.get(request_id)
        if req is None or req.is_finished:
            return False
        self.scheduler.finish(req, insert=req.lifecycle is Lifecycle.RUNNING)
        self._finish(req, FinishReason.ABORT)
        return True

    def fail(self, request_id: str, message: str) -> StepOutput | None:
        """Finish a request with an error now (its KV freed, nothing cached); None if it
        is unknown or already done. For failures found outside a step (PD: a peer died
        or timed out)."""
        req = self.requests.get(request_id)
        if req is None or req.is_finished:
            return None
        self.scheduler.finish(req, insert=False)
        req.error = message
        self._finish(req, FinishReason.ERROR)
        return StepOutput(req, [], "", True, error=message)

    def has_unfinished(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running)

    # ---- stepping -------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """Run one step. Never raises for a failed step (see the module docstring)
        except EngineCorrupted; returns outputs of sampled, dropped and failed requests."""
        t0 = time.perf_counter()
        try:
            sched = self.scheduler.schedule()
        except Exception as e:
            return self._contain(e, self.scheduler.touched())
        outputs = [self._dropped(d) for d in sched.dropped]
        items = sched.items
        if not items:
            return outputs
        try:
            outputs += self._run(items)
        except Exception as e:
            outputs += self._contain(e, [i.req for i in items])
        self.metrics.on_step(sum(i.num_tokens for i in items), time.perf_counter() - t0)
        return outputs

    def _run(self, items: list[ScheduledItem]) -> list[StepOutput]:
        """Execute one scheduled batch, then its KV bookkeeping and token handling."""
        sampling = [k for k, i in enumerate(items) if i.completes]
        result = self.executor.execute(items, sampling)
        for i in items:
            self.cache.mark_computed(i.req.kv, i.prefix_len + i.num_tokens)
        if self.cfg.enable_prefix_cache:
            self._commit_to_cache(items)
        return self._emit([items[k].req for k in sampling], result)

    def _contain(self, error: Exception, reqs: list[Request]) -> list[StepOutput]:
        """Fail `reqs` (the requests of the step that raised), release their KV, and
        check integrity; EngineCorrupted if the bookkeeping is broken."""
        log.error("engine step failed (%s: %s); failing its %d requests",
                  type(error).__name__, error, len(reqs), exc_info=error)
        message = f"internal error while running this request: {type(error).__name__}: {error}"
        outputs, seen = [], set()
        try:
            for req in reqs:
                if req.is_finished or id(req) in seen:
                    continue
                seen.add(id(req))
                self.scheduler.finish(req, insert=False)
                req.error = message
                self._finish(req, FinishReason.ERROR)
                outputs.append(StepOutput(req, [], "", True, error=message))
            self.check_integrity()
        except Exception as broken:
            raise EngineCorrupted(f"KV bookkeeping broken after a failed step: {broken}") from broken
        return outputs

    def _dropped(self, d: Dropped) -> StepOutput:
        """A request the scheduler finished without running it further."""
        req = d.req
        if d.reason is FinishReason.ERROR:
            req.error = d.message
            log.warning("request %s failed: %s", req.request_id, d.message)
        self._finish(req, d.reason)
        text = self._texts[req.request_id].take_delta(True)
        return StepOutput(req, [], text, True, error=req.error)

    def _commit_to_cache(self, items: list[ScheduledItem]) -> None:
        """Hand each request's newly committed whole pages to the tree and re-lock there.

        After every prefill chunk, and whenever a decoding request has filled another
        page: the tree then pins only the window before the new end, and the SWA of
        older windows becomes evictable. This keeps a request's pinned SWA at about
        one window plus one page (the request-owned partial page).
        """
        page = self.cfg.page_size
        for i in items:
            kv = i.req.kv
            if not i.completes or page_floor(kv.kv_len, page) > kv.protected_len:
                # the chunk that completes the prompt: later identical prompts end here
                prompt_end = i.completes and i.req.num_output_tokens == 0
                self.cache.cache_unfinished(kv, anchor=prompt_end)

    def _emit(self, reqs: list[Request], result: ExecuteResult) -> list[StepOutput]:
        """Append each sampled token, detokenise, and finish requests that stop."""
        outputs = []
        now = time.monotonic()
        for j, req in enumerate(reqs):
            token = int(result.token_ids[j])
            lp = result.logprobs[j] if j < len(result.logprobs) else None
            req.token_ids.append(token)
            if lp is not None:
                req.output_logprobs.append(lp)
            if req.first_token_time is None:
                req.first_token_time = now
            text = self._texts[req.request_id]
            reason = text.add_token(token, req.num_output_tokens, req.max_new_tokens == 0)
            if reason is not None:
                self.scheduler.finish(req)
                self._finish(req, reason)
            outputs.append(StepOutput(req, [token], text.take_delta(reason is not None),
                                      reason is not None, None if lp is None else (lp,)))
        return outputs

    def _finish(self, req: Request, reason: FinishReason) -> None:
        req.lifecycle = Lifecycle.FINISHED
        req.finish_reason = reason
        req.finish_time = time.monotonic()
        self.metrics.on_finish(req)

    def output_text(self, request_id: str) -> str:
        return self._texts[request_id].text

    def release(self, request_id: str) -> None:
        """Forget a finished request's bookkeeping (the server calls it after replying)."""
        req = self.requests.get(request_id)
        if req is not None and req.is_finished:
            del self.requests[request_id]
            del self._texts[request_id]

    # ---- inspection -----------------------------------------------------------------
    def check_integrity(self) -> None:
        """Every invariant of the KV bookkeeping; the pools' own checks where there are
        pools (an engine run by the simulator's executor has none)."""
        self.allocator.check_integrity()
        if self.kv_pool is not None:
            self.kv_pool.check_integrity()
        self.req_table.check_integrity()
        self.cache.check_integrity(self.scheduler.live_kvs())
        for req in self.scheduler.waiting:
            assert req.kv is None, f"waiting request {req.request_id} holds KV"

    def snapshot(self) -> EngineSnapshot:
        """Pool usage, queue lengths and counters (what /metrics exports)."""
        stats = self.cache.stats()
        c, m = self.scheduler.counters, self.metrics
        counters = {
            "prefix_hit_tokens": c.prefix_hit_tokens,
            "prefix_lookup_tokens": c.prefix_lookup_tokens,
            "window_miss_tokens": c.window_miss_tokens,
            "full_miss_tokens": c.full_miss_tokens,
            "host_hit_tokens": c.host_hit_tokens,
            "retractions": c.num_retractions,
            "steps": m.num_steps,
            "scheduled_tokens": m.num_scheduled_tokens,
            "finished": m.num_finished,
            "aborted": m.num_aborted,
            "failed": m.num_failed,
            "prompt_tokens": m.num_prompt_tokens,
            "output_tokens": m.num_output_tokens,
        }
        host_total = host_free = Need()
        if isinstance(self.cache, HiCache):
            host_total, host_free = self.cache.host_usage()
            counters.update(self.cache.host_counters())
        return EngineSnapshot(self.allocator.total(), self.allocator.available(), stats.cached,
                              stats.evictable, len(self.scheduler.waiting),
                              len(self.scheduler.running), counters, host_total, host_free)

    def flush_cache(self) -> None:
        """Evict everything the cache holds that no running request pins."""
        total = self.allocator.total()
        self.cache.evict(total)
