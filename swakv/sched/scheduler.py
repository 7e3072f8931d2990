"""The scheduler: admission with two budgets, chunked prefill, decode allocation,
frontier advances, and the memory-shortfall ladder ending in retraction.

It decides; the cache facade (`swakv.cache.KVCache`) does: every row, slot and page
is taken and freed through the facade, never through the allocator or the request
table directly. Each `schedule()` returns the work of one engine step: items whose
slots are already allocated (item i computes positions [kv_len, kv_len + num_tokens)
of its request), and the requests it had to drop (finished without running).

Shortfall ladder, run when an allocation does not fit, each rung only if the ones
before left a shortfall, and only for what is still short:
  1. advance every running request's frontier as far as the rule allows,
  2. evict the cache's SWA (tombstones; no full page is freed),
  3. evict the cache's full KV (unlocked leaves, oldest first),
  4. retract the running request that has made the least progress (decode shortfall,
     or nothing could be scheduled at all).
A request that cannot fit even when it is the only one running is finished at once:
`length` if it reached the full pool's capacity, otherwise an error. So every step
schedules something while work is admitted, or drops what can never run: no spin.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from swakv.cache.protocol import KVCache
from swakv.cache.req_kv import ReqKV
from swakv.memory.allocator.base import OutOfKVMemory
from swakv.memory.pages import Need, max_frontier
from swakv.sched.cost import CostModel
from swakv.sched.request import FinishReason, Lifecycle, Request


@dataclass(frozen=True)
class ScheduledItem:
    req: Request
    prefix_len: int  # == req.kv.kv_len before the step
    num_tokens: int

    @property
    def completes(self) -> bool:
        """True when this item computes the last missing token, so it samples."""
        return self.prefix_len + self.num_tokens == len(self.req.token_ids)


@dataclass(frozen=True)
class Dropped:
    """A request the scheduler finished without running it further."""

    req: Request
    reason: FinishReason  # LENGTH (full pool capacity reached) or ERROR
    message: str


@dataclass(frozen=True)
class SchedulerOutput:
    items: list[ScheduledItem]
    dropped: list[Dropped] = field(default_factory=list)


@dataclass
class SchedulerCounters:
    """The one source of prefix-hit accounting: counted when an admission goes ahead."""

    num_retractions: int = 0
    prefix_hit_tokens: int = 0
    prefix_lookup_tokens: int = 0
    window_miss_tokens: int = 0  # full KV was cached but the SWA window was missing
    full_miss_tokens: int = 0
    host_hit_tokens: int = 0  # part of prefix_hit_tokens loaded back from the host tier
    num_dropped: int = 0


class Scheduler:
    def __init__(self, cost: CostModel, cache: KVCache, max_running_requests: int) -> None:
        self.cost = cost
        self.cache = cache
        self.max_running = max_running_requests
        self.page = cache.page
        self.window = cost.window
        self.chunk_size = cost.chunk_size
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.counters = SchedulerCounters()
        self._touched: list[Request] = []  # requests given KV in the current schedule()

    # ---- queue ----------------------------------------------------------------------
    def add(self, req: Request) -> None:
        req.lifecycle = Lifecycle.WAITING
        self.waiting.append(req)

    def live_kvs(self) -> list[ReqKV]:
        return [r.kv for r in self.running if r.kv is not None]

    def touched(self) -> list[Request]:
        """Requests the last `schedule()` gave KV to (admitted, chunked or decoded), even
        if it raised midway: the engine fails exactly these when a step fails."""
        return list(self._touched)

    # ---- one step -------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        self._touched = []
        dropped: list[Dropped] = []
        with self.cache.batch_free():
            self._advance_frontiers(force=False)
        while True:
            items = self._schedule_decodes(dropped)
            budget = self.chunk_size
            for req in [r for r in self.running if r.is_prefilling]:
                if budget <= 0:
                    break
                item = self._schedule_chunk(req, budget)
                if item is not None:
                    items.append(item)
                    budget -= item.num_tokens
            while budget > 0 and self.waiting and len(self.running) < self.max_running:
                item = self._admit(self.waiting[0], budget)
                if item is None:
                    break
                items.append(item)
                budget -= item.num_tokens
            if items or not (self.running or self.waiting):
                return SchedulerOutput(items, dropped)
            # Nothing fits. Free the least-progress request, or drop what can never run.
            if len(self.running) > 1:
                self._retract(self._victim())
            elif self.running:
                dropped.append(self._drop(self.running[0]))
            else:
                dropped.append(self._drop(self.waiting[0]))

    # ---- decode ---------------------------------------------------------------------
    def _schedule_decodes(self, dropped: list[Dropped]) -> list[ScheduledItem]:
        while True:
            decoding = [r for r in self.running if not r.is_prefilling]
            if not decoding:
                return []
            kvs = [r.kv for r in decoding]
            if self._make_room(self.cache.decode_need(kvs)):
                break
            if len(self.running) > 1:
                self._retract(self._victim())
            else:
                dropped.append(self._drop(decoding[0]))
        self._touched += decoding  # before the call: if it raises, these are the step's
        self.cache.decode(kvs)
        return [ScheduledItem(r, r.kv.kv_len, 1) for r in decoding]

    # ---- prefill --------------------------------------------------------------------
    def _schedule_chunk(self, req: Request, budget: int) -> ScheduledItem | None:
        """Allocate the next prompt chunk of a request, or None if memory is short."""
        kv = req.kv
        self._advance_one(req, force=True)
        n = min(req.num_tokens_to_compute, budget)
        if not self._make_room(self.cache.extend_need(kv, n)):
            return None
        if req not in self._touched:
            self._touched.append(req)
        self.cache.extend(kv, n)
        return ScheduledItem(req, kv.kv_len, n)

    def _admit(self, req: Request, budget: int) -> ScheduledItem | None:
        """Match, lock and allocate the first chunk of the queue head, if both budgets allow."""
        if not self.cache.can_admit():
            return None
        match = self.cache.match(req.token_ids[: len(req.token_ids) - 1])
        req.kv = self.cache.admit(req.token_ids, match)
        self._touched.append(req)
        # A host-tier load-back happened inside admit: its window (and full pages) are
        # now locked by this request, so `held` and the budget both charge them.
        outstanding = self.cost.outstanding(req)
        if self.running and not outstanding.fits(self._budget(exclude=req)):
            self._unadmit(req)
            return None
        item = self._schedule_chunk(req, budget)
        if item is None:
            self._unadmit(req)
            return None
        self.waiting.popleft()
        self._count_match(req, match)
        req.lifecycle = Lifecycle.RUNNING
        self.running.append(req)
        return item

    def _count_match(self, req: Request, match) -> None:
        """The hit is what the admission mapped: the device match, plus whatever a host
        tier loaded back (`protected_len` right after admit)."""
        c = self.counters
        hit = req.kv.protected_len
        if req.num_retractions == 0:
            req.cached_prompt_tokens = hit
        looked_up = len(req.token_ids)
        c.prefix_lookup_tokens += looked_up
        c.prefix_hit_tokens += hit
        c.host_hit_tokens += hit - match.prefix_len
        c.window_miss_tokens += max(0, match.full_only_len - hit)
        c.full_miss_tokens += looked_up - max(match.full_only_len, hit)

    def _budget(self, exclude: Request) -> Need:
        """Free + evictable capacity minus what running requests may still allocate."""
        total = self.cache.available() + self.cache.evictable()
        for r in self.running:
            if r is not exclude:
                total = total - self.cost.outstanding(r)
        return total

    # ---- memory ---------------------------------------------------------------------
    def _make_room(self, need: Need) -> bool:
        """Rungs 1-3 of the shortfall ladder; True when `need` fits the free pools."""
        for rung in self._ladder(need):
            if self.cache.can_allocate(need):
                return True
            rung()
        return self.cache.can_allocate(need)

    def _ladder(self, need: Need) -> Iterator:
        def frontiers() -> None:
            with self.cache.batch_free():
                self._advance_frontiers(force=True)

        def evict_swa() -> None:
            short = need.swa - self.cache.available().swa
            if short > 0:
                self.cache.evict(Need(0, short))

        def evict_full() -> None:
            short = need.full - self.cache.available().full
            if short > 0:
                self.cache.evict(Need(short, 0))

        yield from (frontiers, evict_swa, evict_full)

    def _advance_frontiers(self, force: bool) -> None:
        for r in self.running:
            self._advance_one(r, force)

    def _advance_one(self, req: Request, force: bool) -> None:
        kv = req.kv
        if self.window is None or kv is None:
            return
        target = max_frontier(kv.kv_len, self.window, self.page)
        if target - max(kv.frontier, kv.protected_len) >= (1 if force else self.cost.frontier_stride):
            self.cache.advance_frontier(kv, target)

    def _victim(self) -> Request:
        """Least progress first: fewest outputs, then fewest computed tokens, then newest."""
        return min(
            reversed(self.running),
            key=lambda r: (r.num_output_tokens, r.num_computed_tokens),
        )

    def _retract(self, req: Request) -> None:
        """Free a running request's KV (its committed prefix stays in the cache) and requeue it.

        The request keeps its outputs; on re-admission prompt + outputs are matched
        and recomputed, so a client sees no difference but time.
        """
        self.running.remove(req)
        self.cache.cache_finished(req.kv)
        req.kv = None
        if req in self._touched:
            self._touched.remove(req)
        req.num_retractions += 1
        self.counters.num_retractions += 1
        req.lifecycle = Lifecycle.RETRACTED
        self.waiting.appendleft(req)

    def _drop(self, req: Request) -> Dropped:
        """Finish a request that cannot fit even alone: `length` when it reached the
        full pool's capacity (its next token needs a slot the pool does not have),
        otherwise an error. Its KV is cached (committed prefix) or freed."""
        capacity = self.cache.total().full
        at_capacity = len(req.token_ids) >= capacity and req.num_output_tokens > 0
        need = self.cost.need(req)
        self.finish(req, insert=req.lifecycle is Lifecycle.RUNNING)
        self.counters.num_dropped += 1
        if at_capacity:
            return Dropped(req, FinishReason.LENGTH,
                           f"reached the full KV pool's capacity of {capacity} tokens")
        error = OutOfKVMemory(need, self.cache.total())
        return Dropped(req, FinishReason.ERROR, f"request cannot be scheduled: {error}")

    def _unadmit(self, req: Request) -> None:
        """Undo an admission that did not go ahead (nothing was computed)."""
        self.cache.release(req.kv)
        req.kv = None
        if req in self._touched:
            self._touched.remove(req)

    def _drop_kv(self, req: Request, insert: bool) -> None:
        """Give up `req`'s KV: cache its committed prefix (`insert`) or release it all."""
        if req.kv is not None:
            if insert:
                self.cache.cache_finished(req.kv)
            else:
                self.cache.release(req.kv)
            req.kv = None

    def finish(self, req: Request, insert: bool = True) -> None:
        """A request ended (or failed): cache (or drop) its KV, forget it."""
        self._drop_kv(req, insert)
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
