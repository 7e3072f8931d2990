"""Locks of the radix tree: `LockOps` is mixed into `RadixTree` (see `tree.py` for
the rules: a lock raises a full count on every node from its end to the root and an
SWA count on the nodes overlapping the window `[P - (W - 1), P)`; splits keep live
handles exact; a request's handle moves down its own path with `relock`).

Locks are only ever taken on device-resident nodes (the device-resident nodes form
a root-connected subtree, so a locked end's whole path is on the device).
"""

from __future__ import annotations

from swakv.cache.node import LockError, LockHandle, MatchEnd, StaleMatch, TreeNode
from swakv.memory.pages import swa_tail_start


class LockOps:
    """The lock half of `RadixTree` (uses its `_split`, `_account`, `_push`, touches)."""

    window: int
    page: int
    root: TreeNode

    def _resolve(self, end: MatchEnd) -> TreeNode:
        """The device-resident node covering position `end.prefix_len - 1` (root for 0)."""
        plen, node = end.prefix_len, end.node
        while node.parent is not None and (not node.in_tree or node.start >= plen):
            node = node.parent
        if (node.parent is None) != (plen == 0) or plen > node.end or not (
                node.on_device or node.parent is None):
            raise StaleMatch(f"end {plen} is no longer in the tree on the device")
        return node

    def lock(self, end: MatchEnd) -> LockHandle:
        """Lock a usable end: full counts to the root, SWA counts on its window."""
        plen = end.prefix_len
        node = self._resolve(end)
        lo = max(0, plen - (self.window - 1))
        self._check_window(node, plen, lo)
        if plen < node.end:
            node = self._split(node, plen - node.start)
        self._split_at(node, swa_tail_start(plen, self.window, self.page))
        handle = LockHandle(plen, node, owner=self)
        n = node
        while n.parent is not None:
            self._hold(handle, n, n.end > lo)
            n = n.parent
        self._touch_path(node, plen)
        return handle

    def relock(self, handle: LockHandle, end: MatchEnd) -> None:
        """Move a live `handle` down its own path from P to the end P' >= P that
        `insert_from(handle, ...)` returned, in place (no second handle, no unlock).

        Full counts are raised on the nodes between the old and the new end; SWA counts
        move to the window `[P' - (W - 1), P')`: nodes that fell out of it lose theirs,
        new nodes inside it gain one (the window only moves forward, so no older node
        re-enters it). Cost O(new nodes + W / page), independent of P.
        """
        self._check_handle(handle)
        plen = end.prefix_len
        if plen < handle.prefix_len:
            raise ValueError(f"relock moves ends forward: {handle.prefix_len} -> {plen}")
        node = self._resolve(end)
        lo = max(0, plen - (self.window - 1))
        self._check_window(node, plen, lo)
        if plen < node.end:
            node = self._split(node, plen - node.start)
        self._split_at(node, swa_tail_start(plen, self.window, self.page))
        new_nodes, n = [], node
        while n is not handle.end_node:
            if n.parent is None:
                raise ValueError(f"relock: end {plen} is not below the handle's end")
            new_nodes.append(n)
            n = n.parent
        kept = []
        for n in handle.swa_nodes:
            if n.end > lo:
                kept.append(n)
                continue
            self._account(n, -1)
            n.swa_lock -= 1
            n.lockers[handle] = False
            self._account(n, 1)
            self._push(n)
        handle.swa_nodes = kept
        for n in new_nodes:
            self._hold(handle, n, n.end > lo)
        handle.prefix_len, handle.end_node = plen, node
        self._touch_recent(node, plen, plen)

    def _check_window(self, node: TreeNode, plen: int, lo: int) -> None:
        """StaleMatch unless SWA is live on the path nodes overlapping [lo, plen)."""
        n = node
        while n.parent is not None and min(n.end, plen) > lo:
            if not n.swa_live:
                raise StaleMatch(f"end {plen}: window [{lo}, {plen}) is no longer live")
            n = n.parent

    def _hold(self, handle: LockHandle, n: TreeNode, in_window: bool) -> None:
        """Raise `handle`'s full count on `n`, and its SWA count when `in_window`."""
        self._account(n, -1)
        n.full_lock += 1
        handle.full_nodes.append(n)
        if in_window:
            n.swa_lock += 1
            handle.swa_nodes.append(n)
        n.lockers[handle] = in_window
        self._account(n, 1)

    def _check_handle(self, handle: LockHandle) -> None:
        if handle.owner is not self:
            raise LockError("lock handle issued by another tree")
        if handle.released:
            raise LockError("lock handle already released")

    def unlock(self, handle: LockHandle, touch: bool = False) -> None:
        """Release exactly the counts `handle` raised; LockError if released or foreign.

        With `touch`, the whole locked path counts as used now (LRU), as a lock does:
        a request that committed page by page refreshes its path once, when it ends.
        """
        self._check_handle(handle)
        for n in handle.full_nodes:
            if handle not in n.lockers or n.full_lock <= 0:
                raise LockError(f"handle does not hold {n}")
        handle.released = True
        if touch:
            self._touch_path(handle.end_node, handle.prefix_len)
        for n in handle.full_nodes:
            swa = n.lockers.pop(handle)
            self._account(n, -1)
            n.full_lock -= 1
            if swa:
                if n.swa_lock <= 0:
                    raise LockError(f"SWA count of {n} is not held")
                n.swa_lock -= 1
            self._account(n, 1)
            self._push(n)
