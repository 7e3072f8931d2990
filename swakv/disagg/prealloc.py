"""Decode-side preallocation: the two-budget queue and host-copy restores.

A request reaches the decode worker without KV. Before the prefill worker may write
it, the decode worker takes destination pages:
```
match = cache.match(prompt)            decode-side prefix hit P (page aligned)
kv = cache.admit(prompt, match)        locks [0, P)
cache.extend_remote(kv, L, s)          full pages for [P, L), SWA pages for [s, L),
                                       s = page_floor(max(P, L - W)); frontier = s
```
`s` is the SWA span of `plan.plan_transfer(P, L, W, page)`, so the page lists sent in
`Prealloc` line up with what the prefill worker sends. A retracted request is
restored the same way from its host copy (`restore_from_copy`).

Budgets (both pools, tokens; the cost model's `Need`): a queued request needs what
it will hold once decoding, `cost.need_for(L + 1, remaining outputs, 0)` (full: its
length plus the decode reserve; SWA: one window plus slack), and takes it from
`free + evictable - outstanding(running) - outstanding(preallocated, KV not landed)`.
With SWA tail preallocation the SWA it takes now is the tail (at most W + page - 1
tokens), not the prompt; `tail=False` (a test switch) maps SWA for the whole
prompt like a naive decode worker, and long prompts then wait for the SWA pool.
Requests wait in FIFO order while either budget is short; only a request that
cannot fit even when nothing else holds KV is refused (`NeverFits`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from swakv.cache.protocol import KVCache
from swakv.cache.req_kv import ReqKV
from swakv.disagg.pd_sched import DecodeScheduler
from swakv.memory.kv_pool import KVCopy, KVPool
from swakv.memory.pages import Need, page_ceil
from swakv.sched.cost import CostModel
from swakv.sched.request import Request


class NeverFits(Exception):
    """A request whose preallocation cannot fit even with nothing else holding KV."""


@dataclass(eq=False)
class Pending:
    """A request waiting for destination pages: a new one (KV from `peer`, the prefill
    worker's control address) or a retracted one (`copy`: its host copy)."""

    req: Request
    peer: str | None = None
    copy: KVCopy | None = None

    @property
    def is_restore(self) -> bool:
        return self.copy is not None

    @property
    def seq_len(self) -> int:
        """Positions whose KV the request needs: the prompt, or [0, kv_len) when restoring."""
        return len(self.req.token_ids) - (1 if self.is_restore else 0)

    @property
    def remaining_after(self) -> int:
        """Outputs it may still produce once it decodes (a new request's first token
        comes with its KV)."""
        return self.req.max_new_tokens - (0 if self.is_restore else 1)


def covered_start(swa_mask: torch.Tensor, start: int, end: int, page: int) -> int:
    """Smallest page boundary t >= start with SWA for every position of [t, end).

    Example, page 4, mask of [0, 12) = F F F F F T T T T T T T, start 0 -> 8.
    """
    missing = torch.nonzero(~swa_mask[start:end]).flatten()
    if missing.numel() == 0:
        return start
    return page_ceil(start + int(missing[-1]) + 1, page)


def copy_suffix(copy: KVCopy, start: int) -> KVCopy:
    """The part of a host copy holding positions [start, num_tokens)."""
    skip = int(copy.swa_mask[:start].sum())
    return KVCopy(
        full_k=tuple(t[start:] for t in copy.full_k),
        full_v=tuple(t[start:] for t in copy.full_v),
        swa_k=tuple(t[skip:] for t in copy.swa_k),
        swa_v=tuple(t[skip:] for t in copy.swa_v),
        swa_mask=copy.swa_mask[start:],
    )


class Preallocator:
    """Admits queued requests into destination pages under the two budgets."""

    def __init__(self, cost: CostModel, cache: KVCache, scheduler: DecodeScheduler,
                 kv_pool: KVPool, tail: bool = True) -> None:
        self.cost, self.cache, self.scheduler, self.kv_pool = cost, cache, scheduler, kv_pool
        self.tail = tail
        self.queue: deque[Pending] = deque()
        self.needs: dict[str, Need] = {}  # held request id -> its need once decoding

    # ---- budgets (side-effect free) ------------------------------------------------
    def held_outstanding(self, req: Request) -> Need:
        need = self.needs.get(req.request_id)
        if need is None or req.kv is None:
            return Need(0, 0)
        return (need - self.cost.held(req)).clamp_min(0)

    def budget(self, exclude: Request | None = None) -> Need:
        """Free + evictable tokens minus what running and preallocated requests may
        still take (both pools; may be negative)."""
        total = self.cache.available() + self.cache.evictable()
        for r in self.scheduler.running:
            if r is not exclude:
                total = total - self.cost.outstanding(r)
        for r in self.scheduler.held.values():
            if r is not exclude:
                total = total - self.held_outstanding(r)
        return total

    def _others_hold_kv(self) -> bool:
        return bool(self.scheduler.running) or any(
            r.kv is not None for r in self.scheduler.held.values())

    # ---- admission -------------------------------------------------------------------
    def try_admit(self, item: Pending) -> ReqKV | None:
        """Lock the decode-side prefix hit and allocate the rest (SWA: the tail) if both
        budgets allow; returns the held request's ReqKV, or None with nothing taken.
        Raises NeverFits if it could not fit even alone."""
        req, seq_len, cache = item.req, item.seq_len, self.cache
        if not cache.can_admit():
            return None
        alone = not self._others_hold_kv()
        match = cache.match(req.token_ids[:seq_len])
        kv = req.kv = cache.admit(req.token_ids, match)
        self.scheduler.hold(req)
        try:
            swa_start = self._swa_start(item, kv, seq_len)
            alloc = cache.remote_need(kv, seq_len, swa_start)
            need = self.cost.need_for(seq_len + 1, max(0, item.remaining_after), 0)
            self.needs[req.request_id] = need
            outstanding = (need - self.cost.held(req)).clamp_min(0)
            if not alone and not outstanding.fits(self.budget(exclude=req)):
                self._undo(req)
                return None
            if not self.scheduler.make_room(alloc):
                self._undo(req)
                if alone:  # nothing else holds KV that could be freed later
                    raise NeverFits(f"{req.request_id}: preallocating {alloc} tokens does not "
                                    f"fit the pools ({cache.total()}) even alone")
                return None
            cache.extend_remote(kv, seq_len, swa_start)
        except BaseException:
            if req.request_id in self.scheduler.held:
                self._undo(req)
            raise
        if req.num_retractions == 0:  # the hit admit mapped (a host tier may add to match's)
            req.cached_prompt_tokens = kv.protected_len
        return kv

    def _swa_start(self, item: Pending, kv: ReqKV, seq_len: int) -> int:
        if not self.tail:
            return kv.kv_len
        start = self.cache.remote_swa_start(kv, seq_len)
        if item.copy is not None:  # map no SWA the copy lacks (see DecodeScheduler)
            start = max(start, covered_start(item.copy.swa_mask, kv.kv_len, seq_len,
                                             self.cache.page))
        return start

    def _undo(self, req: Request) -> None:
        """Give back what try_admit took (the lock, the row, any pages)."""
        self.needs.pop(req.request_id, None)
        self.scheduler.release_held(req, insert=False)

    def drop(self, req: Request, insert: bool) -> None:
        """Free a held request's KV (it failed, was aborted, or was abandoned)."""
        self.needs.pop(req.request_id, None)
        self.scheduler.release_held(req, insert=insert)

    def landed(self, req: Request) -> None:
        """Its KV `[0, alloc_len)` is in place: mark it computed; the request is still
        held (the caller starts it with `EngineCore.add_decoding` or `resume`)."""
        kv = req.kv
        assert kv is not None
        self.cache.mark_computed(kv, kv.alloc_len)
        self.needs.pop(req.request_id, None)
        if not self.tail:  # naive mode mapped SWA for the whole span: free what no query reads
            self.scheduler.advance_to_max_frontier(req)

    # ---- restores ----------------------------------------------------------------------
    def restore_from_copy(self, item: Pending) -> None:
        """Load the host copy of positions [hit, kv_len) into a preallocated request and
        resume it (outputs unchanged: the next query reads exactly the KV it had)."""
        req, copy = item.req, item.copy
        kv = req.kv
        assert copy is not None and kv is not None
        start = kv.protected_len
        slots = self.cache.req_table.read(kv.row, start, kv.alloc_len)
        self.kv_pool.load_cpu_copy(copy_suffix(copy, start), slots)
        self.landed(req)
        self.scheduler.resume(req)
