"""A least-recently-used queue of tree nodes: a binary heap with lazy invalidation.

Entries are `(time, seq, node)`. An entry is **valid** when the caller's predicate
says the node is still eligible and `time` equals the node's current time for this
queue; everything else is skipped when popped. So refreshing a node or making it
eligible is a push, making it ineligible costs nothing, and a pop costs O(log n)
per entry it skips or returns: eviction work is proportional to what is evicted
plus stale entries that earlier pushes paid for.

The heap is compacted (stale entries dropped) when it holds more than
`2 * live_hint + 64` entries, so its size stays proportional to the tree.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable

from swakv.cache.node import TreeNode

Valid = Callable[[TreeNode, int], bool]


class LazyLRU:
    """Min-heap by time of eligible nodes; `valid(node, time)` decides eligibility."""

    def __init__(self, valid: Valid) -> None:
        self._heap: list[tuple[int, int, TreeNode]] = []
        self._seq = itertools.count()
        self._valid = valid

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, time: int, node: TreeNode) -> None:
        heapq.heappush(self._heap, (time, next(self._seq), node))

    def pop(self) -> TreeNode | None:
        """Remove and return the oldest valid node, or None if there is none."""
        heap = self._heap
        while heap:
            time, _, node = heapq.heappop(heap)
            if self._valid(node, time):
                return node
        return None

    def maybe_compact(self, live_hint: int) -> None:
        """Drop stale entries when the heap grew past twice the live node count."""
        if len(self._heap) <= 2 * live_hint + 64:
            return
        seen: set[int] = set()
        kept = []
        for entry in self._heap:
            node = entry[2]
            if id(node) not in seen and self._valid(node, entry[0]):
                seen.add(id(node))
                kept.append(entry)
        heapq.heapify(kept)
        self._heap = kept

    def valid_nodes(self) -> set[int]:
        """ids of nodes with at least one valid entry (for integrity checks)."""
        return {id(e[2]) for e in self._heap if self._valid(e[2], e[0])}
