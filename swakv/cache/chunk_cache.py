"""`ChunkCache`: the facade without sharing (prefix caching off).

Every page a request holds is request-owned (`protected_len == 0`, no lock); match
always returns 0; finishing or releasing frees everything; evict frees nothing.
Rows, slots and the frontier work as in `PrefixCache` (`CacheBase`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from swakv.cache.base import CacheBase, CacheStats
from swakv.cache.node import MatchResult
from swakv.cache.req_kv import ReqKV
from swakv.memory.allocator.base import INDEX_DTYPE
from swakv.memory.pages import Need


class ChunkCache(CacheBase):
    """Same interface as `PrefixCache` (`KVCache`); nothing is ever shared or cached."""

    def match(self, token_ids: Sequence[int] | torch.Tensor) -> MatchResult:
        return MatchResult(0, torch.zeros(0, dtype=INDEX_DTYPE), None, 0)

    def admit(self, token_ids: list[int], match: MatchResult) -> ReqKV:
        if match.prefix_len:
            raise ValueError("ChunkCache.admit: a match with a prefix")
        return self._open(token_ids)

    def cache_unfinished(self, req: ReqKV, anchor: bool = False) -> None:
        """Nothing to do: the request keeps owning all its pages."""

    def cache_finished(self, req: ReqKV) -> None:
        self._free_own(req, 0)
        self._close(req)

    def release(self, req: ReqKV) -> None:
        self._free_own(req, 0)
        self._close(req)

    def evict(self, need: Need) -> Need:
        return Need(0, 0)

    def evictable(self) -> Need:
        return Need(0, 0)

    def stats(self) -> CacheStats:
        zero = Need(0, 0)
        return CacheStats(cached=zero, evictable=zero, protected=zero, num_nodes=0,
                          **self._counters)

    def check_integrity(self, live: Iterable[ReqKV]) -> None:
        live = list(live)
        self.allocator.check_integrity()
        self.req_table.check_integrity()
        for req in live:
            assert req.protected_len == 0 and req.lock is None, f"{req}: ChunkCache shares"
        owners = self._new_owner_count()
        self._check_requests(live, owners)
        self._check_owners(owners)
