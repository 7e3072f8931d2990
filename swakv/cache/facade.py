"""The scheduler-facing cache facade: `PrefixCache` (radix tree) and its base.

The scheduler talks only to a facade (DESIGN §10). Per request it owns a `ReqKV`
whose fields the facade keeps consistent with the request row, the tree locks and
the allocator (see `req_kv.py` for the ownership map). Lifecycle:

```
m = cache.match(prompt)            read-only
cache.admit(req, m)                lock m.end; row[0, P) = tree slots; all lens = P
   ... scheduler: alloc_extend, write KV, kv_len/alloc_len grow
cache.advance_frontier(req, f)     free SWA of request-owned [max(frontier, protected_len), f')
cache.cache_unfinished(req)        tree takes [0, page_floor(kv_len)); re-lock there
cache.cache_finished(req)          tree takes [0, page_floor(kv_len)); rest freed; unlock
cache.release(req)                 abort/retract: request-owned pages freed; unlock
```
`cache_finished` and `release` reset the request's lengths and lock to zero / None:
it owns nothing afterwards; freeing its row is the scheduler's job.
`evict` must not run inside `allocator.batch_free()`: the tombstones it makes must be
unmapped at once (a later revival checks it). Other calls may run inside one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from swakv.cache.node import MatchResult
from swakv.cache.req_kv import ReqKV
from swakv.cache.tree import RadixTree
from swakv.memory.allocator.swa import SWAAllocator
from swakv.memory.pages import Need, max_frontier, page_floor
from swakv.memory.req_table import ReqTable


@dataclass(frozen=True)
class CacheStats:
    """Sizes in tokens per pool (`Need(full, swa)`) and counters since creation.

    `cached`: tokens the tree holds (swa: live SWA only). `evictable` / `protected`:
    per component, unlocked / locked (SWA: SWA-locked). `hit_tokens`: sum of admitted
    prefix lengths; `window_miss_tokens`: sum of `full_only_len - prefix_len` at
    admission (full KV present but window missing); `prompt_tokens`: sum of admitted
    requests' token counts. `dedup_tokens` / `revived_tokens` / `inserted_tokens`:
    insert outcomes.
    """

    cached: Need
    evictable: Need
    protected: Need
    num_nodes: int
    admitted: int
    prompt_tokens: int
    hit_tokens: int
    window_miss_tokens: int
    inserted_tokens: int
    dedup_tokens: int
    revived_tokens: int


class CacheBase:
    """What both facades share: the frontier, freeing request-owned pages, ownership."""

    def __init__(self, allocator: SWAAllocator, req_table: ReqTable, page_size: int,
                 window: int) -> None:
        if allocator.page_size != page_size:
            raise ValueError(f"allocator page size {allocator.page_size} != {page_size}")
        self.allocator = allocator
        self.req_table = req_table
        self.page = page_size
        self.window = window
        self._counters = dict.fromkeys(
            ("admitted", "prompt_tokens", "hit_tokens", "window_miss_tokens",
             "inserted_tokens", "dedup_tokens", "revived_tokens"), 0)

    def _free_own(self, req: ReqKV, start: int) -> None:
        """Free the request's pages of positions `[start, alloc_len)` with their SWA."""
        if req.alloc_len > start:
            self.allocator.free(self.req_table.read(req.row, start, req.alloc_len))

    @staticmethod
    def _reset(req: ReqKV) -> None:
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

    def _check_requests(self, live: Sequence[ReqKV], owners: torch.Tensor) -> None:
        """Per-request checks; adds each request-owned full page to `owners`."""
        p, w = self.page, self.window
        rows = [r.row for r in live]
        assert len(set(rows)) == len(rows), "two live requests share a row"
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


class PrefixCache(CacheBase):
    """Radix prefix cache with window-aware matching, locking and eviction."""

    def __init__(self, allocator: SWAAllocator, req_table: ReqTable, page_size: int,
                 window: int) -> None:
        super().__init__(allocator, req_table, page_size, window)
        self.tree = RadixTree(allocator, page_size, window)

    def match(self, token_ids: Sequence[int] | torch.Tensor) -> MatchResult:
        """Deepest usable page-aligned prefix of `token_ids` (read-only).

        A scheduler that needs logits for the last prompt token passes `prompt[:-1]`.
        """
        return self.tree.match(token_ids)

    def admit(self, req: ReqKV, match: MatchResult) -> None:
        """Lock `match.end` (right after `match`, no evict in between) and map the hit.

        Sets row `[0, P)` to the tree's slots and `kv_len = alloc_len = protected_len =
        frontier = P`. Raises StaleMatch if the end was evicted meanwhile.
        """
        if req.lock is not None or req.alloc_len:
            raise ValueError(f"admit: request already holds KV: {req}")
        if match.end is None:
            raise ValueError("admit: match without an end (from another cache type)")
        plen = match.prefix_len
        handle = self.tree.lock(match.end)
        if plen:
            self.req_table.write(req.row, 0, match.full_slots)
        req.kv_len = req.alloc_len = req.protected_len = req.frontier = plen
        req.lock = handle
        c = self._counters
        c["admitted"] += 1
        c["prompt_tokens"] += len(req.token_ids)
        c["hit_tokens"] += plen
        c["window_miss_tokens"] += match.full_only_len - plen

    def _insert(self, req: ReqKV) -> int:
        """Give the tree `[0, L)`, L = page_floor(kv_len); rewrite the row; return L."""
        plen = page_floor(req.kv_len, self.page)
        if plen <= req.protected_len:
            return req.protected_len
        slots = self.req_table.read(req.row, 0, plen)
        res = self.tree.insert(req.token_ids[:plen], slots, req.protected_len, req.frontier)
        self.req_table.write(req.row, req.protected_len, res.full_slots[req.protected_len:])
        new = self.tree.lock(res.end)
        if req.lock is not None:
            self.tree.unlock(req.lock)
        req.lock = new
        req.protected_len = plen
        c = self._counters
        c["inserted_tokens"] += res.new_len
        c["dedup_tokens"] += res.dedup_len
        c["revived_tokens"] += res.revived_len
        return plen

    def cache_unfinished(self, req: ReqKV) -> None:
        """Insert `[0, page_floor(kv_len))`, re-lock there: protected_len moves up."""
        self._insert(req)

    def cache_finished(self, req: ReqKV) -> None:
        """Insert `[0, page_floor(kv_len))`, free the request's pages beyond, unlock."""
        plen = self._insert(req)
        self._free_own(req, plen)
        if req.lock is not None:
            self.tree.unlock(req.lock)
        self._reset(req)

    def release(self, req: ReqKV) -> None:
        """Abort/retract: free request-owned `[protected_len, alloc_len)`, unlock."""
        self._free_own(req, req.protected_len)
        if req.lock is not None:
            self.tree.unlock(req.lock)
        self._reset(req)

    def evict(self, need: Need) -> Need:
        """Evict tree KV for `need` tokens per pool (see `RadixTree.evict`)."""
        return self.tree.evict(need)

    def evictable(self) -> Need:
        """Tokens `evict` could free per pool now (unlocked full, SWA-unlocked live SWA)."""
        return Need(self.tree.full_evictable, self.tree.swa_evictable)

    def stats(self) -> CacheStats:
        t = self.tree
        return CacheStats(
            cached=Need(t.full_protected + t.full_evictable, t.swa_protected + t.swa_evictable),
            evictable=Need(t.full_evictable, t.swa_evictable),
            protected=Need(t.full_protected, t.swa_protected),
            num_nodes=t.num_nodes,
            **self._counters,
        )

    def check_integrity(self, live: Iterable[ReqKV]) -> None:
        """Tree, allocator and request checks, and one owner per full page."""
        live = list(live)
        self.allocator.check_integrity()
        self.req_table.check_integrity()
        self.tree.check_integrity()
        p, w = self.page, self.window
        owners = torch.zeros(self.allocator.full.pages.num_pages + 1, dtype=torch.long)
        for node in self.tree.nodes():
            pages = node.value[::p] // p  # type: ignore[index]
            owners.index_add_(0, pages, torch.ones_like(pages))
        for req in live:
            h = req.lock
            assert h is not None and not h.released, f"{req}: live request without a lock"
            assert h.prefix_len == req.protected_len, f"{req}: lock at {h.prefix_len}"
            end = h.end_node
            assert end.alive and end.end == req.protected_len, f"{req}: lock end {end}"
            path, n = [], end
            while n.parent is not None:
                path.append(n)
                n = n.parent
            lo = max(0, req.protected_len - (w - 1))
            assert {id(x) for x in h.full_nodes} == {id(x) for x in path}, f"{req}: full path"
            swa_path = {id(x) for x in path if x.end > lo}
            assert {id(x) for x in h.swa_nodes} == swa_path, f"{req}: SWA window nodes"
            row = self.req_table.read(req.row, 0, req.protected_len)
            assert torch.equal(row, self.tree.path_slots(end)), f"{req}: row != tree slots"
        self._check_requests(live, owners)
        self._check_owners(owners)
