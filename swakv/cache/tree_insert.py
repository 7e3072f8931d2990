"""Insertion into the radix tree: `InsertOps` is mixed into `RadixTree` (`tree.py`).

**Insert rule (dedup and revival).** For a request's prefix `[0, n)` with
`[0, protected_len)` already the tree's (held by the request's lock), walk the path:
- spans the tree already holds at or beyond `protected_len`: the request's pages are
  duplicates and are freed (`allocator.free`, which frees their SWA too); the caller
  rewrites its row with `InsertResult.full_slots`;
- except that a **tombstone** span whose request pages still have live SWA (all of it
  at or beyond `max(frontier, protected_len)`; the node is split at that boundary
  first) is **revived**: the tree node keeps its full pages and adopts the request's
  SWA pages (`SWAAllocator.move_swa`: page i of the request's span and page i of the node
  hold the same tokens at the same positions, so the SWA KV is exactly what the node
  lacks); then the request's full pages are freed as duplicates. The node's slots
  never change, so this is safe even while other requests lock the node (their rows
  hold those slots), and the node's SWA stays the mapping of its own full pages;
- the rest becomes new nodes owned by the tree: `[pos, live_from)` tombstones and
  `[live_from, n)` live. A live new span longer than `cap = page_ceil(W)` is split
  into `[.., n - cap)` and a capped leaf `[n - cap, n)`, so locking that leaf pins
  exactly one window of SWA.

Insertion never evicts: the request's pages are already allocated, and whatever the
tree does not keep (duplicates) is freed here with `allocator.free`.
"""

from __future__ import annotations

import torch

from swakv.cache.node import InsertResult, LockHandle, MatchEnd, TokenIds, TreeNode, as_tokens
from swakv.memory.allocator.base import INDEX_DTYPE
from swakv.memory.allocator.swa import SWAAllocator
from swakv.memory.pages import page_ceil


class InsertOps:
    """The insert half of `RadixTree` (uses its `_split`, `_common`, `_account`,
    `_push`, touches and `_check_handle`)."""

    allocator: SWAAllocator
    page: int
    cap: int
    root: TreeNode
    num_nodes: int

    def _revive(self, node: TreeNode, own: torch.Tensor) -> None:
        """Tombstone `node` adopts the SWA pages of the request's pages `own`."""
        assert node.value is not None
        self.allocator.move_swa(node.value, own)
        self._account(node, -1)
        node.swa_live = True
        self._account(node, 1)
        self._push(node)

    def _adopt(self, node: TreeNode, own: torch.Tensor, live: bool) -> None:
        """A host-only node takes the request's full pages `own` as its device value
        (their SWA is live iff `live`: the caller split the node at the frontier)."""
        assert node.value is None and node.parent is not None and node.parent.value is not None
        self._account(node, -1)
        node.value = own.clone()
        node.swa_live = live
        self._account(node, 1)
        self._push(node)
        self._push(node.parent)

    def _add_child(self, parent: TreeNode, toks: tuple[int, ...], slots: torch.Tensor,
                   a: int, b: int, base: int, live: bool) -> TreeNode:
        """New node for positions [a, b); `toks`/`slots` index position q at q - base."""
        key = toks[a - base : b - base]
        child = TreeNode(parent, key, slots[a - base : b - base].clone(), a, live)
        child.hits = 1  # an insert is the first use (write-through at threshold 1)
        parent.children[key[: self.page]] = child
        self._account(child, 1)
        self.num_nodes += 1
        self._push(child)  # swa_time 0: oldest, unless a touch refreshes it
        return child

    def insert(self, token_ids: TokenIds, full_slots: torch.Tensor,
               protected_len: int, frontier: int) -> InsertResult:
        """Insert a request's committed prefix `[0, n)`; see the module docstring.

        `full_slots[i]` is the request's full slot of position i; `[0, protected_len)`
        is already the tree's; request positions below `frontier` have no SWA.
        Walks from the root: O(n). A request that already holds a lock at
        `protected_len` uses `insert_from`, whose cost does not depend on that length.
        """
        toks = as_tokens(token_ids)
        p, n = self.page, len(toks)
        if n % p or int(full_slots.numel()) != n or protected_len % p or not 0 <= protected_len <= n:
            raise ValueError(f"insert: n={n} slots={full_slots.numel()} protected={protected_len}")
        res = self._insert(self.root, 0, toks, full_slots, protected_len, frontier)
        self._touch_path(res.end.node, n)
        return res

    def insert_from(self, handle: LockHandle, token_ids: TokenIds, full_slots: torch.Tensor,
                    frontier: int) -> InsertResult:
        """Insert positions `[P, P + m)` below the end that `handle` locks (P =
        `handle.prefix_len`); `token_ids` / `full_slots` hold only those m positions.

        Everything on the path to P is the tree's and pinned by `handle`, so the walk
        starts at `handle.end_node`: the cost is O(m + W / page), independent of P (a
        decoding request commits each filled page this way). `InsertResult.full_slots`
        covers `[P, P + m)`; `prefix_len` and `end` are absolute (P + m).
        """
        self._check_handle(handle)
        toks = as_tokens(token_ids)
        p, base = self.page, handle.prefix_len
        if len(toks) % p or int(full_slots.numel()) != len(toks):
            raise ValueError(f"insert_from: {len(toks)} tokens, {full_slots.numel()} slots")
        node = handle.end_node
        assert node.end == base or node is self.root, (node, base)
        res = self._insert(node, base, toks, full_slots, base, frontier)
        self._touch_recent(res.end.node, res.prefix_len, base)
        return res

    def _insert(self, node: TreeNode, base: int, toks: tuple[int, ...], full_slots: torch.Tensor,
                protected_len: int, frontier: int) -> InsertResult:
        """Walk down from `node` (ending at `base`) inserting positions [base, n).

        `toks[i]` / `full_slots[i]` belong to position base + i; n = base + len(toks).
        """
        p, n = self.page, base + len(toks)
        live_from = max(protected_len, page_ceil(frontier, p))
        pos = base
        pieces: list[torch.Tensor] = []
        dups: list[torch.Tensor] = []
        dedup = revived = adopted = 0
        while pos < n:
            child = node.children.get(toks[pos - base : pos - base + p])
            if child is None:
                break
            m = self._common(child.key, toks, pos - base, n - base)
            cuts = [m, protected_len - pos] + ([] if child.swa_live else [live_from - pos])
            cut = min((c for c in cuts if 0 < c < len(child.key)), default=0)
            if cut:
                child, m = self._split(child, cut), min(m, cut)
            assert m == len(child.key)
            if pos >= protected_len:
                own = full_slots[pos - base : pos - base + m]
                if child.value is None:  # on the host only: the request's pages come home
                    self._adopt(child, own, pos >= live_from)
                    adopted += m
                else:
                    if not child.swa_live and pos >= live_from:
                        self._revive(child, own)
                        revived += m
                    dups.append(own)
                    dedup += m
            assert child.value is not None
            pieces.append(child.value)
            node, pos = child, pos + m
        if pos < protected_len:
            raise ValueError(f"insert: protected prefix [0, {protected_len}) not in the tree")
        new_len = n - pos
        if new_len:
            t = min(max(live_from, pos), n)
            spans = [(pos, t, False)] if t > pos else []
            if n - t > self.cap:
                spans += [(t, n - self.cap, True), (n - self.cap, n, True)]
            elif n > t:
                spans.append((t, n, True))
            for a, b, live in spans:
                node = self._add_child(node, toks, full_slots, a, b, base, live)
                pieces.append(node.value)  # type: ignore[arg-type]
        if dups:
            self.allocator.free(torch.cat(dups) if len(dups) > 1 else dups[0])
        slots = torch.cat(pieces) if pieces else torch.zeros(0, dtype=INDEX_DTYPE)
        return InsertResult(n, slots, MatchEnd(node, n), dedup, revived, new_len + adopted)
