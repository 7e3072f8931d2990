"""The scheduler: admission with two budgets, chunked prefill, decode allocation,
frontier advances, and the memory-shortfall ladder ending in retraction.

Each `schedule()` returns the work of one engine step as `ScheduledItem`s, whose row
slots are already allocated: item i computes positions
[kv.kv_len, kv.kv_len + num_tokens) of its request.

Shortfall ladder (decode or prefill allocation that does not fit):
  1. advance every running request's frontier as far as the rule allows,
  2. evict the cache's SWA, then its full KV (one `evict(Need)` call),
  3. retract the running request that has made the least progress.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from swakv.cache.req_kv import ReqKV
from swakv.memory.allocator.base import OutOfKVMemory
from swakv.memory.allocator.swa import SWAAllocator
from swakv.memory.pages import Need, max_frontier, page_ceil
from swakv.memory.req_table import ReqTable
from swakv.sched.cost import CostModel
from swakv.sched.request import Lifecycle, Request


@dataclass(frozen=True)
class ScheduledItem:
    req: Request
    prefix_len: int  # == req.kv.kv_len before the step
    num_tokens: int

    @property
    def completes(self) -> bool:
        """True when this item computes the last missing token, so it samples."""
        return self.prefix_len + self.num_tokens == len(self.req.token_ids)


@dataclass
class SchedulerCounters:
    num_retractions: int = 0
    prefix_hit_tokens: int = 0
    prefix_lookup_tokens: int = 0
    window_miss_tokens: int = 0  # full KV was cached but the SWA window was missing
    full_miss_tokens: int = 0


class Scheduler:
    def __init__(
        self,
        cost: CostModel,
        allocator: SWAAllocator,
        req_table: ReqTable,
        cache,  # PrefixCache or ChunkCache (same facade)
        max_running_requests: int,
    ) -> None:
        self.cost = cost
        self.allocator = allocator
        self.req_table = req_table
        self.cache = cache
        self.max_running = max_running_requests
        self.page = allocator.page_size
        self.window = cost.window
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.counters = SchedulerCounters()
        self.chunk_size = cost.chunk_size

    # ---- queue ----------------------------------------------------------------------
    def add(self, req: Request) -> None:
        req.lifecycle = Lifecycle.WAITING
        self.waiting.append(req)

    def remove(self, req: Request) -> None:
        """Forget a finished or aborted request; its KV must already be released."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)

    def live_kvs(self) -> list[ReqKV]:
        return [r.kv for r in self.running if r.kv is not None]

    # ---- one step -------------------------------------------------------------------
    def schedule(self) -> list[ScheduledItem]:
        items: list[ScheduledItem] = []
        with self.allocator.batch_free():
            self._advance_frontiers(force=False)
        items += self._schedule_decodes()
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
        if not items and self.running:
            # Everything running is stuck on memory: free the least-progress request.
            self._retract(self._victim())
            return self.schedule()
        return items

    # ---- decode ---------------------------------------------------------------------
    def _schedule_decodes(self) -> list[ScheduledItem]:
        while True:
            decoding = [r for r in self.running if not r.is_prefilling]
            if not decoding:
                return []
            cur_lens = torch.tensor([r.kv.kv_len for r in decoding], dtype=torch.int64)
            new_pages = int((cur_lens % self.page == 0).sum())
            if self._make_room(Need(new_pages * self.page, new_pages * self.page)):
                break
            self._retract(self._victim())
        rows = torch.tensor([r.kv.row for r in decoding], dtype=torch.int64)
        prev = (cur_lens - 1).clamp_min(0)
        last_slots = self.req_table.slots[rows, prev]
        slots = self.allocator.alloc_decode(cur_lens, last_slots)
        self.req_table.slots[rows, cur_lens] = slots
        for r in decoding:
            r.kv.alloc_len = r.kv.kv_len + 1
        return [ScheduledItem(r, r.kv.kv_len, 1) for r in decoding]

    # ---- prefill --------------------------------------------------------------------
    def _schedule_chunk(self, req: Request, budget: int) -> ScheduledItem | None:
        """Allocate the next prompt chunk of a running request, or None if memory is short."""
        kv = req.kv
        self._advance_one(req, force=True)
        n = min(req.num_tokens_to_compute, budget)
        need = self._chunk_need(kv, n)
        if not self._make_room(need):
            return None
        last = int(self.req_table.slots[kv.row, kv.kv_len - 1]) if kv.kv_len else None
        slots = self.allocator.alloc_extend(kv.kv_len, kv.kv_len + n, last)
        self.req_table.write(kv.row, kv.kv_len, slots)
        kv.alloc_len = kv.kv_len + n
        return ScheduledItem(req, kv.kv_len, n)

    def _chunk_need(self, kv: ReqKV, n: int) -> Need:
        start, end = kv.kv_len, kv.kv_len + n
        pages = (page_ceil(end, self.page) - page_ceil(start, self.page)) // self.page
        return Need(pages * self.page, pages * self.page)

    def _admit(self, req: Request, budget: int) -> ScheduledItem | None:
        """Match, lock and allocate the first chunk of the queue head, if both budgets allow."""
        if self.req_table.num_free == 0:
            return None
        match = self.cache.match(req.token_ids[: len(req.token_ids) - 1])
        kv = ReqKV(row=self.req_table.alloc_row(), token_ids=req.token_ids)
        self.cache.admit(kv, match)
        req.kv = kv
        outstanding = self.cost.outstanding(req)
        if not outstanding.fits(self._budget(exclude=req)) and self.running:
            self._release(req)
            return None
        item = self._schedule_chunk(req, budget)
        if item is None:
            self._release(req)
            return None
        self.waiting.popleft()
        self._count_match(req, match)
        req.lifecycle = Lifecycle.RUNNING
        self.running.append(req)
        return item

    def _count_match(self, req: Request, match) -> None:
        c = self.counters
        if req.num_retractions == 0:
            req.cached_prompt_tokens = match.prefix_len
        looked_up = len(req.token_ids)
        c.prefix_lookup_tokens += looked_up
        c.prefix_hit_tokens += match.prefix_len
        c.window_miss_tokens += max(0, match.full_only_len - match.prefix_len)
        c.full_miss_tokens += looked_up - max(match.full_only_len, match.prefix_len)

    def _budget(self, exclude: Request) -> Need:
        """Free + evictable capacity minus what running requests may still allocate."""
        total = self.allocator.available() + self.cache.evictable()
        for r in self.running:
            if r is not exclude:
                total = total - self.cost.outstanding(r)
        return total

    # ---- memory ---------------------------------------------------------------------
    def _make_room(self, need: Need) -> bool:
        """Try steps 1-2 of the shortfall ladder; True when `need` fits the free pools."""
        if need.fits(self.allocator.available()):
            return True
        with self.allocator.batch_free():
            self._advance_frontiers(force=True)
        short = (need - self.allocator.available()).clamp_min(0)
        if not short.is_zero():
            self.cache.evict(short)
        return need.fits(self.allocator.available())

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
        if len(self.running) <= 1 and req in self.running and not self.waiting:
            # A lone request always fits by submission checks; reaching here is a bug.
            raise OutOfKVMemory(self.cost.need(req), self.allocator.available())
        self.running.remove(req)
        self.cache.cache_finished(req.kv)
        self.req_table.free_row(req.kv.row)
        req.kv = None
        req.num_retractions += 1
        self.counters.num_retractions += 1
        req.lifecycle = Lifecycle.RETRACTED
        self.waiting.appendleft(req)

    def _release(self, req: Request) -> None:
        """Undo an admission that did not go ahead (nothing was computed)."""
        self.cache.release(req.kv)
        self.req_table.free_row(req.kv.row)
        req.kv = None

    def finish(self, req: Request, insert: bool = True) -> None:
        """A running request ended: cache (or drop) its KV and free its row."""
        if req.kv is not None:
            if insert:
                self.cache.cache_finished(req.kv)
            else:
                self.cache.release(req.kv)
            self.req_table.free_row(req.kv.row)
            req.kv = None
        self.remove(req)
