"""`PrefixCache`: the radix-tree facade (sharing, window-aware match, eviction).

See `base.py` for the lifecycle every facade follows and `protocol.KVCache` for the
interface. Commits are incremental: a request holds one lock handle for its whole
life; `cache_unfinished` inserts only the pages filled since the last commit, below
the handle's end (`RadixTree.insert_from`), and moves the handle down (`relock`), so a
page commit costs O(page + W / page) whatever the request's length.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from swakv.cache.base import CacheBase, CacheStats
from swakv.cache.node import MatchResult
from swakv.cache.req_kv import ReqKV
from swakv.cache.tree import RadixTree
from swakv.memory.allocator.swa import SWAAllocator
from swakv.memory.pages import Need, page_floor
from swakv.memory.req_table import ReqTable


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

    def admit(self, token_ids: list[int], match: MatchResult) -> ReqKV:
        """Take a row, lock `match.end` (right after `match`, no evict in between) and
        map the hit: row `[0, P)` = the tree's slots, `kv_len = alloc_len =
        protected_len = frontier = P`. StaleMatch (nothing taken) if the end was
        evicted meanwhile; NoFreeRow if no row is free.
        """
        if match.end is None:
            raise ValueError("admit: match without an end (from another cache type)")
        handle = self.tree.lock(match.end)
        try:
            req = self._open(token_ids)
        except Exception:
            self.tree.unlock(handle)
            raise
        plen = match.prefix_len
        if plen:
            self.req_table.write(req.row, 0, match.full_slots)
        req.kv_len = req.alloc_len = req.protected_len = req.frontier = plen
        req.lock = handle
        return req

    def _insert(self, req: ReqKV) -> int:
        """Give the tree `[protected_len, L)`, L = page_floor(kv_len); rewrite that part
        of the row with the tree's slots; move the lock to L. Returns L."""
        plen = page_floor(req.kv_len, self.page)
        start = req.protected_len
        if plen <= start:
            return start
        assert req.lock is not None, f"{req}: committing without a lock"
        slots = self.req_table.read(req.row, start, plen)
        res = self.tree.insert_from(req.lock, req.token_ids[start:plen], slots, req.frontier)
        self.req_table.write(req.row, start, res.full_slots)
        self.tree.relock(req.lock, res.end)
        req.protected_len = plen
        c = self._counters
        c["inserted_tokens"] += res.new_len
        c["dedup_tokens"] += res.dedup_len
        c["revived_tokens"] += res.revived_len
        return plen

    def cache_unfinished(self, req: ReqKV, anchor: bool = False) -> None:
        """Insert `[protected_len, page_floor(kv_len))`; protected_len moves up.
        (`anchor`: the prompt just completed; only the host tier uses it.)"""
        self._insert(req)

    def cache_finished(self, req: ReqKV) -> None:
        """Insert `[0, page_floor(kv_len))`, free the request's pages beyond, unlock,
        free the row."""
        plen = self._insert(req)
        self._free_own(req, plen)
        if req.lock is not None:
            self.tree.unlock(req.lock, touch=True)
        self._close(req)

    def release(self, req: ReqKV) -> None:
        """Abort / failed step: free request-owned `[protected_len, alloc_len)`, unlock,
        free the row. Nothing is inserted."""
        self._free_own(req, req.protected_len)
        if req.lock is not None:
            self.tree.unlock(req.lock)
        self._close(req)

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
        w = self.window
        owners = self._new_owner_count()
        p = self.page
        for node in self.tree.nodes():
            if node.value is not None:  # host-only nodes own no device page
                pages = node.value[::p] // p
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
            assert len(h.full_nodes) == len(path), f"{req}: a node held twice"
            swa_path = {id(x) for x in path if x.end > lo}
            assert {id(x) for x in h.swa_nodes} == swa_path, f"{req}: SWA window nodes"
            row = self.req_table.read(req.row, 0, req.protected_len)
            assert torch.equal(row, self.tree.path_slots(end)), f"{req}: row != tree slots"
        self._check_requests(live, owners)
        self._check_owners(owners)
