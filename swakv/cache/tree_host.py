"""The host tier of the radix tree (DESIGN §5): `HostOps` is mixed into `RadixTree`.

Each node may hold host copies next to its device values (`node.py`): host full pages
(`host_full`) and host SWA pages (`host_swa`, None = host tombstone).

- **Backup (write-through).** `note_hits(node)` counts a use of every node on the
  path (inserts count as a use of the new nodes); `maybe_backup(node)` backs up the
  not-yet-backed-up nodes of the path whose count reached `backup_threshold`,
  ancestors first, so backed-up nodes form a root-connected subtree. Only SWA live on
  the device is copied (a device tombstone becomes a host tombstone), and along a
  chain only the newest window keeps host SWA (`_trim_host_swa`): the host holds
  about one window of SWA per cached end, not the prefix. Host pages come from the
  host pool, with host eviction as fallback; the parent of the first new backup is
  pinned meanwhile so it cannot lose its copy.
- **Demotion** (in `RadixTree.evict`): full eviction of a backed-up device leaf frees
  its device pages and keeps the node, host-only.
- **Host eviction** (`evict_host`): an LRU over backed-up nodes (`host_time`); a host
  leaf (no backed-up child) loses its host copy and, when it is not on the device,
  leaves the tree; an internal node loses only its host SWA (a host tombstone).
- **Load-back** (`load_back`): for a match whose host end P lies beyond its device
  end, the host-only nodes of the path get device full pages for all their positions
  and SWA pages only for the pages holding the last W - 1 positions before P (the
  window); device tombstones inside the window get SWA pages too. Full pages are
  pre-evicted on the full pool's shortfall only; the window's SWA pages separately,
  with SWA-only eviction as fallback; if either still does not fit, the end moves
  back to the deepest end whose load fits. The device path is locked (full, and SWA
  on its live window nodes) and the host path pinned until the copy completes.

Copies go through the `CopyEngine` (asynchronous interface; on the CPU it completes at
once). The tree waits for each copy before it changes node state, so device pages are
never freed or read while a copy that touches them is in flight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from swakv.cache.lru import LazyLRU
from swakv.cache.node import LockHandle, MatchEnd, MatchResult, TreeNode
from swakv.memory.allocator.base import INDEX_DTYPE
from swakv.memory.copy_engine import CopyBatch, CopyDirection, CopyEngine, PageCopy
from swakv.memory.host_pool import HostKVPool
from swakv.memory.pages import Need, page_floor

HOST_COUNTERS = ("backed_up_full_tokens", "backed_up_swa_tokens", "demoted_tokens",
                 "host_trimmed_swa_tokens",
                 "host_evicted_full_tokens", "host_evicted_swa_tokens",
                 "loaded_full_tokens", "loaded_swa_tokens", "load_backs",
                 "loads_shortened")


@dataclass(frozen=True)
class HostTier:
    """The host pools, the copy engine between them and the device, and the policy."""

    pool: HostKVPool
    copier: CopyEngine
    backup_threshold: int = 1  # uses (inserts + admitted hits) before a node is backed up


@dataclass(frozen=True)
class LoadPlan:
    """A load-back to end `end` (page aligned): the path's nodes not on the device get
    `num_full_pages` device full pages (all their positions below `end`); the path's
    nodes without device SWA that overlap `[swa_start, end)` get `num_swa_pages` SWA
    pages. `swa_start = page_floor(max(0, end - (W - 1)))`."""

    end: int
    swa_start: int
    num_full_pages: int
    num_swa_pages: int


class HostOps:
    """The host half of `RadixTree` (uses its accounting, LRUs, splits and locks)."""

    def _init_host(self, host: HostTier | None) -> None:
        self.host = host
        self.host_lru = LazyLRU(self._host_valid)
        self.host_counters = dict.fromkeys(HOST_COUNTERS, 0)
        if host is not None and host.pool.page_size != self.page:
            raise ValueError(f"host page size {host.pool.page_size} != {self.page}")

    # ---- eligibility ------------------------------------------------------------------
    @staticmethod
    def _host_evictable(n: TreeNode) -> bool:
        if not n.in_tree or n.host_full is None or n.host_pins or n.parent is None:
            return False
        return n.host_swa is not None or not any(c.host_full is not None
                                                 for c in n.children.values())

    def _host_valid(self, n: TreeNode, time: int) -> bool:
        return n.host_time == time and self._host_evictable(n)

    def _host_touch(self, n: TreeNode) -> None:
        self._clock += 1
        n.host_time = self._clock
        self._push(n)

    # ---- backup -----------------------------------------------------------------------
    def note_hits(self, node: TreeNode) -> None:
        """One more use of every node on the path root..node (an admitted hit)."""
        n = node
        while n.parent is not None:
            n.hits += 1
            if n.host_full is not None:
                self._host_touch(n)
            n = n.parent

    def maybe_backup(self, node: TreeNode) -> int:
        """Back up the path's not-backed-up nodes whose use count reached the threshold,
        ancestors first. Returns tokens backed up."""
        if self.host is None:
            return 0
        chain, n = [], node
        while n.parent is not None and n.host_full is None:
            chain.append(n)
            n = n.parent
        chain.reverse()  # ancestors first; chain[0].parent is backed up or the root
        due = []
        for n in chain:
            if n.hits < self.host.backup_threshold:
                break
            due.append(n)
        return self._backup(due) if due else 0

    def _backup(self, nodes: list[TreeNode]) -> int:
        """Copy `nodes` (root-connected order, all on the device) to the host: as many
        of them, ancestors first, as the host pool holds after host eviction."""
        host, p = self.host, self.page
        assert host is not None
        sizes = [(len(n.key) // p, len(n.key) // p if n.swa_live else 0) for n in nodes]
        want = Need(sum(f for f, _ in sizes), sum(s for _, s in sizes))
        parent = nodes[0].parent
        assert parent is not None
        parent.host_pins += 1  # it must keep its copy: it is about to get a backed-up child
        try:
            short = (want - host.pool.available_pages()).clamp_min(0)
            if not short.is_zero():
                self.evict_host(short)
        finally:
            parent.host_pins -= 1
            self._push(parent)
        have, count, used = host.pool.available_pages(), 0, Need(0, 0)
        for f, s in sizes:
            if not (used + Need(f, s)).fits(have):
                break
            used, count = used + Need(f, s), count + 1
        if count == 0:
            return 0
        nodes = nodes[:count]
        pages = host.pool.alloc(used.full, used.swa)
        dev_full = torch.cat([n.value[::p] // p for n in nodes])  # type: ignore[index]
        live = [n for n in nodes if n.swa_live]
        dev_swa = (self.allocator.full_to_swa_page[torch.cat([n.value[::p] // p for n in live])]
                   if live else torch.zeros(0, dtype=INDEX_DTYPE))
        batch = CopyBatch(CopyDirection.BACKUP, PageCopy(dev_full, pages.full_pages),
                          PageCopy(dev_swa, pages.swa_pages))
        host.copier.submit(batch).wait()
        f_off = s_off = 0
        for n, (f, s) in zip(nodes, sizes):
            self._account(n, -1)
            n.host_full = pages.full_pages[f_off : f_off + f]
            if s:
                n.host_swa = pages.swa_pages[s_off : s_off + s]
            f_off, s_off = f_off + f, s_off + s
            self._account(n, 1)
            self._host_touch(n)
            self._push(n.parent)  # type: ignore[arg-type]
        c = self.host_counters
        c["backed_up_full_tokens"] += used.full * p
        c["backed_up_swa_tokens"] += used.swa * p
        self._trim_host_swa(nodes[-1])
        return used.full * p

    def anchor(self, end: TreeNode) -> None:
        """Mark the window before `end` (a prompt end or a finished request's end: where
        later requests match) so that trimming keeps its host SWA."""
        lo = end.end - self.window - self.page
        n = end
        while n.parent is not None and n.end > lo:
            n.anchored = True
            n = n.parent

    def _trim_host_swa(self, end: TreeNode) -> None:
        """Drop the host SWA of chain nodes more than W + page behind `end`.

        A host SWA copy only serves matches ending within W of it. Along a chain (a
        decode committing page by page, a long prompt committed chunk by chunk) most
        positions never end a match, so their host SWA is dropped as the chain grows
        (a host tombstone; the host full copy stays). Kept: nodes in the window of an
        anchor (a prompt end, a finished request's end: `anchor`) and branch points
        (several children: other continuations end there). So the host holds about a
        window or two of SWA per cached request, not its prefix. Stops at the first
        unanchored node already without host SWA: amortised O(1) per backup.
        """
        p = self.page
        keep_from = end.end - self.window - p
        n = end
        while n.parent is not None:
            if n.end <= keep_from and not n.anchored and len(n.children) <= 1:
                if n.host_swa is None:
                    break
                self._account(n, -1)
                self.host.pool.free(torch.zeros(0, dtype=INDEX_DTYPE), n.host_swa)  # type: ignore[union-attr]
                self.host_counters["host_trimmed_swa_tokens"] += len(n.key)
                n.host_swa = None
                self._account(n, 1)
                self._push(n)
            n = n.parent

    # ---- host eviction ----------------------------------------------------------------
    def evict_host(self, need_pages: Need) -> Need:
        """Free at least `need_pages` host pages per pool if possible (see module doc)."""
        host, p = self.host, self.page
        assert host is not None
        freed = Need(0, 0)
        while not (need_pages - freed).clamp_min(0).is_zero():
            n = self.host_lru.pop()
            if n is None:
                break
            leaf = not any(c.host_full is not None for c in n.children.values())
            self._account(n, -1)
            swa_pages = n.host_swa if n.host_swa is not None else torch.zeros(0, dtype=INDEX_DTYPE)
            full_pages = n.host_full if leaf else torch.zeros(0, dtype=INDEX_DTYPE)
            host.pool.free(full_pages, swa_pages)  # type: ignore[arg-type]
            n.host_swa = None
            if leaf:
                n.host_full = None
            self._account(n, 1)
            freed = freed + Need(int(full_pages.numel()), int(swa_pages.numel()))
            self.host_counters["host_evicted_full_tokens"] += int(full_pages.numel()) * p
            self.host_counters["host_evicted_swa_tokens"] += int(swa_pages.numel()) * p
            if leaf and n.value is None:  # host-only and no longer backed up: it goes
                self._unlink(n)
            else:
                self._push(n)
                self._push(n.parent)  # type: ignore[arg-type]
        self.host_lru.maybe_compact(self.num_nodes)
        return freed

    # ---- load-back --------------------------------------------------------------------
    def load_back(self, match: MatchResult) -> MatchEnd:
        """Bring the host part of `match`'s host end onto the device (see module doc);
        returns the device end it reached (`match.end` if nothing could be loaded)."""
        assert match.host_end is not None and self.host is not None and match.end is not None
        target = self._split_end(match.host_end)
        path = self._path(target)
        dev = [n for n in path if n.value is not None]
        guard = self._guard(dev, target.end)
        try:
            plan = self._fit(path, match.prefix_len, guard)
            if plan is None:
                return match.end
            self.host_counters["loads_shortened"] += plan.end < target.end
            end_node = self._load(path, plan)
        finally:
            self.unlock(guard)
        self.host_counters["load_backs"] += 1
        return MatchEnd(end_node, plan.end)

    def _split_end(self, end: MatchEnd) -> TreeNode:
        """The node ending exactly at `end.prefix_len` (split there if interior)."""
        plen, node = end.prefix_len, end.node
        while node.parent is not None and (not node.in_tree or node.start >= plen):
            node = node.parent
        if plen < node.end:
            node = self._split(node, plen - node.start)
        return node

    @staticmethod
    def _path(node: TreeNode) -> list[TreeNode]:
        """Nodes root..node (root excluded), in path order."""
        out = []
        while node.parent is not None:
            out.append(node)
            node = node.parent
        return out[::-1]

    def _guard(self, dev: list[TreeNode], end: int) -> LockHandle:
        """Lock the device part of the path: full counts on all of it, SWA counts on its
        live nodes overlapping the largest window a load may need, `[.., end)`."""
        lo = max(0, end - (self.window - 1))
        last = dev[-1] if dev else self.root
        handle = LockHandle(last.end if dev else 0, last, owner=self)
        for n in dev:
            self._hold(handle, n, n.swa_live and n.end > page_floor(lo, self.page))
        return handle

    def _needs(self, path: list[TreeNode], end: int) -> tuple[int, int, int] | None:
        """(full pages, SWA pages, swa_start) to make `end` usable on the device, or None
        if some window position has no SWA anywhere (the end is not usable)."""
        p, w = self.page, self.window
        swa_start = page_floor(max(0, end - (w - 1)), p)
        full = swa = 0
        for n in path:
            if n.start >= end:
                break
            hi = min(n.end, end)
            if n.value is None:
                full += (hi - n.start) // p
            if hi > swa_start and not n.swa_live:
                if n.host_swa is None:
                    return None
                swa += (hi - max(n.start, swa_start)) // p
        return full, swa, swa_start

    def _fit(self, path: list[TreeNode], device_end: int, guard: LockHandle) -> LoadPlan | None:
        """The deepest end whose load fits after eviction: full shortfall evicts full KV
        only, the window's SWA shortfall SWA only (never full KV for SWA)."""
        p = self.page
        target = path[-1].end
        needs = self._needs(path, target)
        assert needs is not None, "the host end of a match is usable"
        full, swa, _ = needs
        short_full = full * p - self.allocator.full_available()
        if short_full > 0:
            self.evict(Need(short_full, 0))
        short_swa = swa * p - self.allocator.swa_available()
        if short_swa > 0:
            self.evict(Need(0, short_swa))
        have = Need(self.allocator.full_available(), self.allocator.swa_available())
        for end in range(target, device_end, -p):
            needs = self._needs(path, end)
            if needs is not None and Need(needs[0] * p, needs[1] * p).fits(have):
                return LoadPlan(end, needs[2], needs[0], needs[1])
        return None

    def _load(self, path: list[TreeNode], plan: LoadPlan) -> TreeNode:
        """Split at the plan's boundaries, allocate, copy host -> device, update nodes."""
        p = self.page
        end_node = self._split_end(MatchEnd(path[-1], plan.end))
        self._split_at(end_node, plan.swa_start)
        path = self._path(end_node)
        loads = [n for n in path if n.value is None]
        swa_nodes = [n for n in path if n.end > plan.swa_start and not n.swa_live]
        for n in loads + swa_nodes:
            n.host_pins += 1
        try:
            num_tail = sum(len(n.key) // p for n in loads if n.end > plan.swa_start)
            tombs = [n for n in swa_nodes if n.value is not None]
            full_pages = self.allocator.alloc_pages(
                plan.num_full_pages, num_tail,
                torch.cat([n.value[::p] // p for n in tombs]) if tombs else None)
            slots = (full_pages[:, None] * p + torch.arange(p)).reshape(-1)
            off = 0
            for n in loads:
                k = len(n.key)
                self._account(n, -1)
                n.value, n.swa_live = slots[off : off + k].clone(), False
                self._account(n, 1)
                off += k
            self._copy_in(loads, swa_nodes)
        finally:
            for n in loads + swa_nodes:
                n.host_pins -= 1
        for n in swa_nodes:
            self._account(n, -1)
            n.swa_live = True
            self._account(n, 1)
        for n in loads + swa_nodes:
            self._push(n)
            self._push(n.parent)  # type: ignore[arg-type]
        c = self.host_counters
        c["loaded_full_tokens"] += plan.num_full_pages * p
        c["loaded_swa_tokens"] += plan.num_swa_pages * p
        self._touch_path(end_node, plan.end)
        return end_node

    def _copy_in(self, loads: list[TreeNode], swa_nodes: list[TreeNode]) -> None:
        """Host -> device: full pages of `loads`, SWA pages of `swa_nodes` (whose device
        full pages are now mapped to fresh SWA pages)."""
        p = self.page
        empty = torch.zeros(0, dtype=INDEX_DTYPE)
        src_full = torch.cat([n.host_full for n in loads]) if loads else empty  # type: ignore[misc]
        dst_full = torch.cat([n.value[::p] // p for n in loads]) if loads else empty  # type: ignore[index]
        src_swa = torch.cat([n.host_swa for n in swa_nodes]) if swa_nodes else empty  # type: ignore[misc]
        dst_swa = (self.allocator.full_to_swa_page[torch.cat([n.value[::p] // p for n in swa_nodes])]
                   if swa_nodes else empty)
        batch = CopyBatch(CopyDirection.LOAD, PageCopy(src_full, dst_full),
                          PageCopy(src_swa, dst_swa))
        self.host.copier.submit(batch).wait()  # type: ignore[union-attr]
