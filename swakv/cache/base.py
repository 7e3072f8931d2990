"""What both cache facades share: request rows, slot allocation, the frontier, freeing.

The scheduler reaches KV only through a facade (DESIGN §9, `protocol.KVCache`). The
facade is the one owner of the request table's rows, of every allocator call made for
a request, and of each request's `ReqKV` (see `req_kv.py` for the ownership map):
the scheduler decides, the facade does. Lifecycle of one request:

```
m = cache.match(tokens)               read-only
kv = cache.admit(tokens, m)           takes a row, locks m.end, maps the hit: lens = P
cache.extend(kv, n) / cache.decode(kvs)   slots for [kv_len, kv_len + n): alloc_len
cache.extend_remote(kv, L)            PD decode / restore: slots for [kv_len, L), SWA only
                                      for the tail; KV arrives from outside
   ... the model writes KV ...
cache.mark_computed(kv, kv_len')      KV now exists for [0, kv_len')
cache.advance_frontier(kv, f)         free SWA of request-owned [max(frontier, protected), f')
cache.cache_unfinished(kv)            tree takes [0, page_floor(kv_len)), re-locks there
cache.cache_finished(kv)              tree takes [0, page_floor(kv_len)); rest freed; row freed
cache.release(kv)                     abort / failed step: request-owned pages and row freed
```
Retraction calls `cache_finished` (the committed prefix stays cached, so re-admission
finds it). After `cache_finished` / `release` the ReqKV owns nothing (lengths 0, no
lock, row -1). `evict` must not run inside `batch_free()`: the tombstones it makes must
be unmapped at once (a later revival checks it).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from swakv.cache.req_kv import ReqKV
from swakv.memory.allocator.base import INDEX_DTYPE, KVInvariantError
from swakv.memory.allocator.swa import SWAAllocator
from swakv.memory.pages import Need, max_frontier, num_pages, page_floor
from swakv.memory.req_table import ReqTable

# The window of a model without sliding layers (`window=None`): every earlier token
# stays visible, so no position ever leaves it and no SWA is ever freed; the SWA pool
# is then a zero-byte mirror of the full pool (`sched.sizing.size_pools`).
UNBOUNDED_WINDOW = 1 << 62


@dataclass(frozen=True)
class CacheStats:
    """Sizes in tokens per pool (`Need(full, swa)`) and insert counters since creation.

    `cached`: tokens the tree holds (swa: live SWA only). `evictable` / `protected`:
    per component, unlocked / locked (SWA: SWA-locked). `inserted_tokens` /
    `dedup_tokens` / `revived_tokens`: insert outcomes. Hit and miss counts live in
    the scheduler (it alone knows which admissions went ahead).
    """

    cached: Need
    evictable: Need
    protected: Need
    num_nodes: int
    inserted_tokens: int
    dedup_tokens: int
    revived_tokens: int


class CacheBase:
    """Rows, slots, the frontier and request-owned pages; the tree lives in subclasses."""

    def __init__(self, allocator: SWAAllocator, req_table: ReqTable, page_size: int,
                 window: int | None) -> None:
        if allocator.page_size != page_size:
            raise ValueError(f"allocator page size {allocator.page_size} != {page_size}")
        self.allocator = allocator
        self.req_table = req_table
        self.page = page_size
        self.window = UNBOUNDED_WINDOW if window is None else window
        self._counters = dict.fromkeys(("inserted_tokens", "dedup_tokens", "revived_tokens"), 0)

    # ---- capacity (side-effect free) --------------------------------------------------
    def can_admit(self) -> bool:
        """A request row is free."""
        return self.req_table.num_free > 0

    def available(self) -> Need:
        return self.allocator.available()

    def total(self) -> Need:
        return self.allocator.total()

    def can_allocate(self, need: Need) -> bool:
        """`need` (tokens per pool) fits the free pages now, without eviction."""
        return need.fits(self.allocator.available())

    def extend_need(self, kv: ReqKV, num_tokens: int) -> Need:
        """Pages (as tokens, both pools) that `extend(kv, num_tokens)` takes."""
        k = num_pages(kv.kv_len + num_tokens, self.page) - num_pages(kv.kv_len, self.page)
        return Need(k * self.page, k * self.page)

    def decode_need(self, kvs: Sequence[ReqKV]) -> Need:
        """Pages (as tokens, both pools) that `decode(kvs)` takes: one per request whose
        next position starts a page."""
        k = sum(1 for kv in kvs if kv.kv_len % self.page == 0)
        return Need(k * self.page, k * self.page)

    # ---- allocation -----------------------------------------------------------------
    def _require_settled(self, kv: ReqKV) -> None:
        if kv.alloc_len != kv.kv_len or kv.row < 0:
            raise KVInvariantError(f"allocation for a request that is not settled: {kv}")

    def extend(self, kv: ReqKV, num_tokens: int) -> None:
        """Slots for positions `[kv_len, kv_len + num_tokens)`; OutOfKVMemory (nothing
        taken) if the pools cannot hold them. Sets `alloc_len`."""
        self._require_settled(kv)
        start, end = kv.kv_len, kv.kv_len + num_tokens
        last = int(self.req_table.slots[kv.row, start - 1]) if start else None
        slots = self.allocator.alloc_extend(start, end, last)
        self.req_table.write(kv.row, start, slots)
        kv.alloc_len = end

    def decode(self, kvs: Sequence[ReqKV]) -> None:
        """One slot per request at position `kv_len`, all or nothing (OutOfKVMemory)."""
        if not kvs:
            return
        for kv in kvs:
            self._require_settled(kv)
        lens = np.fromiter((kv.kv_len for kv in kvs), dtype=np.int64, count=len(kvs))
        rows = np.fromiter((kv.row for kv in kvs), dtype=np.int64, count=len(kvs))
        if int(lens.max()) >= self.req_table.max_context:
            raise KVInvariantError(f"decode beyond max_context {self.req_table.max_context}")
        cur, rows_t = torch.from_numpy(lens), torch.from_numpy(rows)
        last_slots = self.req_table.slots[rows_t, (cur - 1).clamp_min(0)]
        slots = self.allocator.alloc_decode(cur, last_slots)
        self.req_table.slots[rows_t, cur] = slots
        for kv in kvs:
            kv.alloc_len = kv.kv_len + 1

    def remote_swa_start(self, kv: ReqKV, seq_len: int) -> int:
        """Default SWA start of `extend_remote`: `page_floor(max(kv_len, seq_len - W))`,
        the SWA span of a PD transfer (`disagg.plan.swa_span_start`). Without sliding
        layers (`UNBOUNDED_WINDOW`) that is kv_len: every position keeps SWA slots (in
        the zero-byte mirror pool), as the window invariant requires; no SWA bytes move."""
        return page_floor(max(kv.kv_len, seq_len - self.window), self.page)

    def remote_need(self, kv: ReqKV, seq_len: int, swa_start: int | None = None) -> Need:
        """Pages (as tokens per pool) that `extend_remote(kv, seq_len, swa_start)` takes."""
        start = self.remote_swa_start(kv, seq_len) if swa_start is None else swa_start
        full = num_pages(seq_len, self.page) - num_pages(kv.kv_len, self.page)
        swa = num_pages(seq_len, self.page) - start // self.page
        return Need(max(0, full) * self.page, max(0, swa) * self.page)

    def extend_remote(self, kv: ReqKV, seq_len: int, swa_start: int | None = None) -> None:
        """Slots for positions `[kv_len, seq_len)` whose KV is written from outside (PD
        decode: by the prefill worker; a restore: from a host copy): full pages for all
        of them, SWA pages only for `[swa_start, seq_len)` (default `remote_swa_start`).

        `kv_len` must be page aligned (an admitted match end) and `swa_start` a page
        boundary in `[kv_len, seq_len]`. Sets `alloc_len = seq_len` and `frontier =
        swa_start`; `kv_len` stays until `mark_computed(kv, seq_len)` once the KV is in
        place. OutOfKVMemory (nothing taken) if the pools cannot hold them.
        Example, W 8, page 4, kv_len 8 (a hit), seq_len 21: full pages for [8, 21), SWA
        for [12, 21) (page_floor(max(8, 13)) = 12), frontier 12.
        """
        self._require_settled(kv)
        start = self.remote_swa_start(kv, seq_len) if swa_start is None else swa_start
        p = self.page
        if kv.kv_len % p or start % p or not kv.kv_len <= start <= seq_len:
            raise KVInvariantError(
                f"extend_remote to {seq_len} with SWA from {start}: not page aligned "
                f"or outside [kv_len, seq_len] for {kv}")
        if seq_len > kv.kv_len:
            slots = self.allocator.alloc_extend_swa_tail(seq_len, seq_len - start, kv.kv_len)
            self.req_table.write(kv.row, kv.kv_len, slots)
        kv.alloc_len = seq_len
        kv.frontier = start

    def mark_computed(self, kv: ReqKV, kv_len: int) -> None:
        """KV is written for `[0, kv_len)` (kv_len <= alloc_len, never backwards)."""
        if not kv.kv_len <= kv_len <= kv.alloc_len:
            raise KVInvariantError(f"mark_computed({kv_len}) outside [kv_len, alloc_len]: {kv}")
        kv.kv_len = kv_len

    @contextmanager
    def batch_free(self) -> Iterator[None]:
        """Apply every free made inside the block once, at exit (see SWAAllocator)."""
        with self.allocator.batch_free():
            yield

    # ---- rows and request-owned pages ---------------------------------------------------
    def _open(self, token_ids: list[int]) -> ReqKV:
        return ReqKV(row=self.req_table.alloc_row(), token_ids=token_ids)

    def _free_own(self, req: ReqKV, start: int) -> None:
        """Free the request's pages of positions `[start, alloc_len)` with their SWA."""
        if req.alloc_len > start:
            self.allocator.free(self.req_table.read(req.row, start, req.alloc_len))

    def _close(self, req: ReqKV) -> None:
        """Give the row back; the request owns nothing afterwards."""
        self.req_table.free_row(req.row)
        req.row = -1
        req.kv_len = req.alloc_len = req.protected_len = req.frontier = 0
        req.lock = None

    def advance_frontier(self, req: ReqKV, new_frontier: int) -> int:
        """Move the frontier to `min(page_floor(new_frontier), max_frontier(kv_len))`.

        Frees the SWA of request-owned positions `[max(frontier, protected_len),
        target)`; never moves back. Returns SWA tokens freed. Example, W 512, page 16,
        kv_len 1000, protected 0, frontier 0: target 480 frees SWA of [0, 480).
        """
        target = min(page_floor(new_frontier, self.page),
                     max_frontier(req.kv_len, self.window, self.page))
        if target <= req.frontier:
            return 0
        start = max(req.frontier, req.protected_len)
        freed = 0
        if target > start:
            self.allocator.free_swa(self.req_table.read(req.row, start, target))
            freed = target - start
        req.frontier = target
        return freed

    # ---- integrity ------------------------------------------------------------------
    def _check_requests(self, live: Sequence[ReqKV], owners: torch.Tensor) -> None:
        """Per-request checks; adds each request-owned full page to `owners`."""
        p, w = self.page, self.window
        rows = [r.row for r in live]
        assert len(set(rows)) == len(rows), "two live requests share a row"
        assert len(rows) == self.req_table.num_rows - self.req_table.num_free, (
            "request rows in use != live requests (a row leaked)")
        for req in live:
            assert 0 <= req.protected_len <= req.kv_len <= req.alloc_len, req
            assert req.protected_len % p == 0 and req.frontier % p == 0, req
            assert req.kv_len <= len(req.token_ids), req
            own = self.req_table.read(req.row, req.protected_len, req.alloc_len)
            pages = torch.unique(own // p)
            owners.index_add_(0, pages, torch.ones_like(pages))
            pos = torch.arange(req.protected_len, req.alloc_len)
            mapped = self.allocator.is_swa_mapped(own)
            assert torch.equal(mapped, pos >= req.frontier), f"{req}: SWA vs frontier"
            lo = max(0, req.kv_len - (w - 1))
            window = self.req_table.read(req.row, lo, req.kv_len)
            assert bool(self.allocator.is_swa_mapped(window).all()), f"{req}: window lost SWA"

    def _check_owners(self, owners: torch.Tensor) -> None:
        owners += self.allocator.full.pages.is_free_mask().long()
        assert int(owners[0]) == 0, "padding page 0 has an owner"
        bad = (owners[1:] != 1).nonzero().flatten()
        assert bad.numel() == 0, f"full pages without exactly one owner: {(bad + 1).tolist()[:8]}"

    def _new_owner_count(self) -> torch.Tensor:
        return torch.zeros(self.allocator.full.pages.num_pages + 1, dtype=INDEX_DTYPE)
