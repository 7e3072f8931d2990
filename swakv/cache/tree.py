"""Window-aware radix tree over page-aligned token keys (DESIGN §4).

Keys are token-id tuples whose lengths are multiples of `page`; children are keyed
by their first page of tokens. Each node holds its full slots (`value`) and an SWA
state (`swa_live`; False = tombstone, see `node.py`).

**Usable ends.** With window W, an end at prefix length P (page aligned) is usable
iff full KV covers `[0, P)` (always, inside the tree) and SWA is live for
`[max(0, P - (W - 1)), P)`. Example, W = 5, page 4: after a tombstone `[0, 8)`, an
end at 12 needs positions 8..11 -> usable; with a tombstone `[4, 8)` an end at 8 is
never usable, an end at 12 is (needs 8..11).

**Insert rule (dedup and revival)**: see `tree_insert.py`. Inserted spans the tree
already holds are freed as duplicates, except that tombstones adopt the request's SWA
(revival); new live spans are capped so that locking a leaf pins one window of SWA.

**Locks.** `lock(end)` splits the end's node at P if P is interior, raises a full
count on every node from the end to the root and an SWA count on the nodes
overlapping `[max(0, P - (W - 1)), P)`. A split registers the new upper node in
every handle holding the lower one: full count always, SWA count iff the upper part
overlaps that handle's window (see `_split`); counts stay exact.

**LRU.** Times come from a counter. Lock and insert set `full_time` on the whole
path and `swa_time` on live nodes overlapping the last `W + page` tokens
`[max(0, P - W - page), P)`. New nodes outside that range get `swa_time = 0`:
their SWA is useless for future matches ending at P, so it goes first.

**Eviction** (`evict(Need)`): first full eviction of unlocked device leaves (no
device-resident child) by `full_time` (cascading to parents that become device
leaves), freeing full pages with their SWA: a backed-up leaf is **demoted** (it stays
in the tree, on the host only), any other is removed; then SWA eviction by `swa_time`
over live nodes with `swa_lock == 0`. A pool the caller asked nothing of loses pages
only as an unavoidable side effect, so: when `need.full > 0`, an SWA-evicted unlocked
device leaf is evicted entirely (demoted or removed); when `need.full == 0` it is only
tombstoned (`evict(Need(0, n))` frees no full page). Internal and full-locked nodes
are always only tombstoned. The host tier (`tree_host.py`) adds backup, host eviction
and load-back; without one, no node is ever backed up and all of the above reduces to
plain removal.

`evict` must not run inside a caller's `allocator.batch_free()` block: its tombstones
must be unmapped when it returns (revival checks the mapping).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from swakv.cache.base import UNBOUNDED_WINDOW
from swakv.cache.lru import LazyLRU
from swakv.cache.node import MatchEnd, MatchResult, TokenIds, TreeNode, as_tokens
from swakv.cache.tree_host import HostOps, HostTier
from swakv.cache.tree_insert import InsertOps
from swakv.cache.tree_lock import LockOps
from swakv.memory.allocator.base import INDEX_DTYPE
from swakv.memory.allocator.swa import SWAAllocator
from swakv.memory.pages import Need, page_ceil, page_floor


class RadixTree(InsertOps, LockOps, HostOps):
    """The tree, its locks, LRUs and per-component sizes (tokens, root excluded).

    `full_protected` / `full_evictable`: tokens of device-resident nodes with / without
    a full lock. `swa_protected` / `swa_evictable`: tokens of live-SWA nodes with /
    without an SWA lock. `host_full_tokens` / `host_swa_tokens`: tokens with a host
    copy of full / SWA KV. Kept incrementally; `check_integrity` recomputes them.
    """

    def __init__(self, allocator: SWAAllocator, page_size: int, window: int | None,
                 host: HostTier | None = None) -> None:
        if allocator.page_size != page_size:
            raise ValueError(f"allocator page size {allocator.page_size} != {page_size}")
        if window is None:  # no sliding layers: see UNBOUNDED_WINDOW
            window = UNBOUNDED_WINDOW
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.allocator = allocator
        self.page = page_size
        self.window = window
        self.cap = page_ceil(window, page_size)
        self.root = TreeNode(None, (), torch.zeros(0, dtype=INDEX_DTYPE), 0, True)
        self.root.full_lock = self.root.swa_lock = 1
        self.full_lru = LazyLRU(self._full_valid)
        self.swa_lru = LazyLRU(self._swa_valid)
        self.num_nodes = 0
        self.full_protected = self.full_evictable = 0
        self.swa_protected = self.swa_evictable = 0
        self.host_full_tokens = self.host_swa_tokens = 0
        self._clock = 0
        self._init_host(host)

    # ---- eligibility and accounting ------------------------------------------------
    @staticmethod
    def _full_evictable_leaf(n: TreeNode) -> bool:
        """An unlocked device leaf: on the device, no child on the device."""
        return (n.in_tree and n.value is not None and n.parent is not None and not n.full_lock
                and not any(c.value is not None for c in n.children.values()))

    @staticmethod
    def _swa_evictable(n: TreeNode) -> bool:
        return (n.in_tree and n.value is not None and n.parent is not None and n.swa_live
                and not n.swa_lock)

    def _full_valid(self, n: TreeNode, time: int) -> bool:
        return n.full_time == time and self._full_evictable_leaf(n)

    def _swa_valid(self, n: TreeNode, time: int) -> bool:
        return n.swa_time == time and self._swa_evictable(n)

    def _account(self, n: TreeNode, sign: int) -> None:
        k = len(n.key) * sign
        if n.value is not None:
            if n.full_lock:
                self.full_protected += k
            else:
                self.full_evictable += k
        if n.swa_live:
            if n.swa_lock:
                self.swa_protected += k
            else:
                self.swa_evictable += k
        if n.host_full is not None:
            self.host_full_tokens += k
            if n.host_swa is not None:
                self.host_swa_tokens += k

    def _push(self, n: TreeNode) -> None:
        """Queue `n` in each LRU it is eligible for, at its current times."""
        if self._full_evictable_leaf(n):
            self.full_lru.push(n.full_time, n)
        if self._swa_evictable(n):
            self.swa_lru.push(n.swa_time, n)
        if self.host is not None and self._host_evictable(n):
            self.host_lru.push(n.host_time, n)

    def _touch_path(self, node: TreeNode, prefix_len: int) -> None:
        """Refresh full times on the path root..node, SWA times in the last W + page."""
        self._touch_recent(node, prefix_len, 0)

    def _touch_recent(self, node: TreeNode, prefix_len: int, since: int) -> None:
        """Refresh the nodes of the path root..node that end past `min(since, lo)`,
        lo = prefix_len - W - page: full times on them, SWA times on live ones past lo.

        With since = 0 that is the whole path; a page commit passes the old end, so it
        touches only its new nodes and the recent window (O(W / page) nodes). Older
        ancestors keep their times: they are locked by the committing request, and
        `unlock(touch=True)` refreshes the whole path when it lets go.
        """
        self._clock += 1
        now = self._clock
        lo = max(0, prefix_len - self.window - self.page)
        stop = min(since, lo)
        n = node
        while n.parent is not None and n.end > stop:
            n.full_time = now
            if n.swa_live and n.end > lo:
                n.swa_time = now
            self._push(n)
            n = n.parent
        self.full_lru.maybe_compact(self.num_nodes)
        self.swa_lru.maybe_compact(self.num_nodes)

    # ---- match ---------------------------------------------------------------------
    def _common(self, key: tuple[int, ...], toks: tuple[int, ...], pos: int, n: int) -> int:
        """Page-aligned common prefix of `key` and `toks[pos:n]` (first page known equal)."""
        p = self.page
        lim = min(len(key), n - pos)
        if lim == len(key):
            if toks[pos : pos + lim] == key:
                return lim
        elif toks[pos : pos + lim] == key[:lim]:
            return lim
        i = p
        while i < lim and key[i : i + p] == toks[pos + i : pos + i + p]:
            i += p
        return i

    def match(self, token_ids: TokenIds) -> MatchResult:
        """Deepest usable page-aligned ends for `token_ids` (read-only, no splits).

        Two walks in one: the device end needs every path node on the device and live
        device SWA on the window; the host end counts KV on the host too (full on the
        device or the host, which every node in the tree has; SWA on either).
        """
        toks = as_tokens(token_ids)
        p, w = self.page, self.window
        n = page_floor(len(toks), p)
        node, pos = self.root, 0
        dev_dead = any_dead = 0  # end of the deepest node without device SWA / any SWA
        on_device = True  # every node so far is on the device
        pieces: list[torch.Tensor] = []
        best = (self.root, 0, 0)  # device: (node, prefix_len, number of pieces)
        best_any = (self.root, 0)  # device or host: (node, prefix_len)
        while pos < n:
            child = node.children.get(toks[pos : pos + p])
            if child is None:
                break
            m = self._common(child.key, toks, pos, n)
            end = pos + m
            on_device = on_device and child.value is not None
            if on_device:
                pieces.append(child.value if m == len(child.key) else child.value[:m])  # type: ignore[index]
                if child.swa_live:
                    usable = dev_dead == 0 or dev_dead + w - 1 <= end
                else:
                    usable, dev_dead = w <= 1, child.end
                if usable:
                    best = (child, end, len(pieces))
            if child.has_swa():
                usable_any = any_dead == 0 or any_dead + w - 1 <= end
            else:
                usable_any, any_dead = w <= 1, child.end
            if usable_any:
                best_any = (child, end)
            node, pos = child, end
            if m < len(child.key):
                break
        bnode, blen, bcount = best
        slots = torch.cat(pieces[:bcount]) if bcount else torch.zeros(0, dtype=INDEX_DTYPE)
        host_end = MatchEnd(best_any[0], best_any[1]) if best_any[1] > blen else None
        return MatchResult(blen, slots, MatchEnd(bnode, blen), pos,
                           max(blen, best_any[1]), host_end)

    # ---- split -------------------------------------------------------------------
    def _split(self, node: TreeNode, k: int) -> TreeNode:
        """Split `node` at offset k (0 < k < len, page aligned); return the new upper node.

        The upper node takes `[start, start + k)`; `node` keeps the lower part (and its
        children, heap entries, counts and identity). Every handle holding `node` is
        registered in the upper node: full count always (locks run to the root), SWA
        count iff the handle held SWA on `node` and the upper part overlaps the
        handle's window `[P - (W - 1), P)` (it ends before the lower part, so only
        its end matters). So counts stay exact and `unlock` replays the handle.
        """
        assert 0 < k < len(node.key) and k % self.page == 0, (k, node)
        parent = node.parent
        assert parent is not None and node.in_tree
        self._account(node, -1)
        value = None if node.value is None else node.value[:k]
        upper = TreeNode(parent, node.key[:k], value, node.start, node.swa_live)
        upper.full_lock = node.full_lock
        upper.full_time, upper.swa_time = node.full_time, node.swa_time
        upper.hits, upper.host_time, upper.host_pins = node.hits, node.host_time, node.host_pins
        upper.anchored = node.anchored
        kp = k // self.page
        if node.host_full is not None:
            upper.host_full, node.host_full = node.host_full[:kp], node.host_full[kp:]
        if node.host_swa is not None:
            upper.host_swa, node.host_swa = node.host_swa[:kp], node.host_swa[kp:]
        for handle, swa in node.lockers.items():
            # the upper part is in the handle's window iff it ends past the window start
            swa = swa and upper.end > handle.prefix_len - (self.window - 1)
            upper.lockers[handle] = swa
            upper.swa_lock += swa
            handle.full_nodes.append(upper)
            if swa:
                handle.swa_nodes.append(upper)
        parent.children[upper.key[: self.page]] = upper
        node.key = node.key[k:]
        if node.value is not None:
            node.value = node.value[k:]
        node.start += k
        node.parent = upper
        upper.children[node.key[: self.page]] = node
        self._account(node, 1)
        self._account(upper, 1)
        self.num_nodes += 1
        self._push(upper)
        return upper

    def _split_at(self, node: TreeNode, pos: int) -> None:
        """Split the node on `node`'s root path that strictly contains page boundary `pos`.

        Lock uses it at the SWA tail start `page_floor(P - W)`, so the SWA count covers
        exactly the tail pages (page_ceil(W) tokens for a page-aligned P, the same
        tail PD transfers use) and older SWA on the path stays evictable.
        """
        n = node
        while n.parent is not None and n.start > pos:
            n = n.parent
        if n.parent is not None and n.start < pos < n.end:
            self._split(n, pos - n.start)

    # ---- eviction ------------------------------------------------------------------
    def _remove(self, node: TreeNode, frees: list[torch.Tensor]) -> Need:
        """Take an unlocked, not backed-up device leaf out of the tree; its pages go to
        `frees`."""
        assert node.value is not None and not node.children and node.host_full is None
        self._account(node, -1)
        frees.append(node.value)
        node.value = None
        self._unlink(node)
        k = len(node.key)
        return Need(k, k if node.swa_live else 0)

    def _unlink(self, node: TreeNode) -> None:
        """Take leaf `node` (no device value, no host copy left: it accounts for nothing)
        out of the tree; it keeps its `parent` so stale ends still resolve upwards."""
        parent = node.parent
        assert parent is not None and not node.children
        del parent.children[node.key[: self.page]]
        node.in_tree = False
        self.num_nodes -= 1
        self._push(parent)

    def _evict_device(self, node: TreeNode, frees: list[torch.Tensor]) -> Need:
        """Free an unlocked device leaf's pages: demote it when backed up, else remove."""
        if node.host_full is None:
            return self._remove(node, frees)
        self._account(node, -1)
        frees.append(node.value)  # type: ignore[arg-type]
        k = len(node.key)
        freed = Need(k, k if node.swa_live else 0)
        node.value, node.swa_live = None, False
        self._account(node, 1)
        self.host_counters["demoted_tokens"] += k
        self._push(node)
        self._push(node.parent)  # type: ignore[arg-type]
        return freed

    def evict(self, need: Need) -> Need:
        """Free at least `need` tokens per pool if possible; returns tokens freed."""
        freed = Need(0, 0)
        frees: list[torch.Tensor] = []
        swa_frees: list[torch.Tensor] = []
        while freed.full < need.full:
            node = self.full_lru.pop()
            if node is None:
                break
            freed = freed + self._evict_device(node, frees)
        while freed.swa < need.swa:
            node = self.swa_lru.pop()
            if node is None:
                break
            if need.full > 0 and self._full_evictable_leaf(node):
                freed = freed + self._evict_device(node, frees)
                continue
            self._account(node, -1)
            node.swa_live = False
            self._account(node, 1)
            swa_frees.append(node.value)  # type: ignore[arg-type]
            freed = freed + Need(0, len(node.key))
        if swa_frees:
            self.allocator.free_swa(torch.cat(swa_frees))
        if frees:
            self.allocator.free(torch.cat(frees))
        self.full_lru.maybe_compact(self.num_nodes)
        self.swa_lru.maybe_compact(self.num_nodes)
        return freed

    # ---- inspection ----------------------------------------------------------------
    def nodes(self) -> Iterator[TreeNode]:
        """Every node but the root, parents before children."""
        stack = list(self.root.children.values())
        while stack:
            n = stack.pop()
            yield n
            stack.extend(n.children.values())

    def path_slots(self, node: TreeNode) -> torch.Tensor:
        """Device full slots of `[0, node.end)` along the path root..node (all on the
        device)."""
        pieces = []
        while node.parent is not None:
            pieces.append(node.value)
            node = node.parent
        return torch.cat(pieces[::-1]) if pieces else torch.zeros(0, dtype=INDEX_DTYPE)

    def check_integrity(self) -> None:
        from swakv.cache.integrity import check_tree

        check_tree(self)
