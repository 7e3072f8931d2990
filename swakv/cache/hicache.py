"""`HiCache`: the prefix cache with a host tier (DESIGN §5, `tree_host.py`).

Same lifecycle and interface as `PrefixCache` (`protocol.KVCache`), plus:
- `match` also reports the host-extended end (`MatchResult.host_prefix_len`);
- `admit` loads the host part of that end back onto the device first (full KV for
  the host-only nodes, SWA for the window only; full pre-eviction on the full pool's
  shortfall only, the window's SWA with SWA-only eviction as fallback; a shorter end
  when the load does not fit), then locks the end reached;
- every admitted hit and every insert counts as a use of the nodes on its path, and
  nodes whose use count reaches `backup_threshold` are backed up to the host
  (write-through, ancestors first).
"""

from __future__ import annotations

from swakv.cache.facade import PrefixCache
from swakv.cache.node import MatchEnd, MatchResult
from swakv.cache.req_kv import ReqKV
from swakv.cache.tree import RadixTree
from swakv.cache.tree_host import HostTier
from swakv.memory.allocator.swa import SWAAllocator
from swakv.memory.pages import Need
from swakv.memory.req_table import ReqTable


class HiCache(PrefixCache):
    def __init__(self, allocator: SWAAllocator, req_table: ReqTable, page_size: int,
                 window: int, host: HostTier) -> None:
        super().__init__(allocator, req_table, page_size, window)
        self.tree = RadixTree(allocator, page_size, window, host)
        self.host = host

    def admit(self, token_ids: list[int], match: MatchResult) -> ReqKV:
        """Load the host part of the match's host end (if any), then lock and map the
        device end reached: `protected_len` tells how far that was."""
        if match.host_end is not None:
            end = self.tree.load_back(match)
            if end.prefix_len > match.prefix_len:
                match = self._device_match(end, match)
        req = super().admit(token_ids, match)
        assert req.lock is not None
        self.tree.note_hits(req.lock.end_node)
        self.tree.maybe_backup(req.lock.end_node)
        return req

    def _device_match(self, end: MatchEnd, old: MatchResult) -> MatchResult:
        """The match of a device end just loaded (its node ends exactly there)."""
        slots = self.tree.path_slots(end.node)
        assert int(slots.numel()) == end.prefix_len
        return MatchResult(end.prefix_len, slots, end, old.full_only_len, old.host_prefix_len)

    def _insert(self, req: ReqKV, anchor: bool = False) -> int:
        before = req.protected_len
        plen = super()._insert(req)
        if req.lock is not None and plen > 0:
            if anchor:
                self.tree.anchor(req.lock.end_node)
            if plen > before:
                self.tree.maybe_backup(req.lock.end_node)
        return plen

    def cache_unfinished(self, req: ReqKV, anchor: bool = False) -> None:
        """Insert `[protected_len, page_floor(kv_len))`; `anchor` when the prompt just
        completed (a later identical prompt matches there: its window keeps host SWA)."""
        self._insert(req, anchor)

    def cache_finished(self, req: ReqKV) -> None:
        plen = self._insert(req, anchor=True)
        self._free_own(req, plen)
        if req.lock is not None:
            self.tree.unlock(req.lock, touch=True)
        self._close(req)

    def host_usage(self) -> tuple[Need, Need]:
        """(total, free) host pool tokens per pool."""
        return self.host.pool.total(), self.host.pool.available()

    def host_counters(self) -> dict[str, int]:
        return dict(self.tree.host_counters)
