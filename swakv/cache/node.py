"""Radix tree nodes, match ends, lock handles and the result types of the tree.

Index conventions: a node covers the token positions `[node.start, node.end)` of
every sequence that walks through it, `node.end = node.start + len(node.key)`; both
are multiples of the page size. `node.value[i]` is the full slot of position
`node.start + i`. The root covers `[0, 0)`.

Device state: `value` holds the node's full slots in the device pool, or None when the
node is not on the device (demoted to the host tier). `swa_live`: True means every
full page of `value` maps to an SWA page in the allocator (its SWA value is
`allocator.translate(value)`); False (a **tombstone**) means every one maps to 0; a
node off the device has `swa_live` False.

Host state (host tier, `tree_host.py`): `host_full` holds one host full-pool page id per
page of the node (None: not backed up), `host_swa` one host SWA-pool page id per page
(None: no SWA on the host, a **host tombstone**; never set without `host_full`).

Every node in the tree is on the device, backed up, or both. Device-resident nodes
form a root-connected subtree (a node on the device has its parent on the device),
and so do backed-up nodes (backups go ancestors first). A node removed from the tree
has `in_tree` False; removed nodes keep their `parent` pointer so a stale `MatchEnd`
can still be resolved upwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

TokenIds = Sequence[int] | torch.Tensor


def as_tokens(token_ids: TokenIds) -> tuple[int, ...]:
    """Token ids as a tuple (the key type of the tree)."""
    if isinstance(token_ids, torch.Tensor):
        return tuple(token_ids.tolist())
    return token_ids if isinstance(token_ids, tuple) else tuple(token_ids)


class LockError(Exception):
    """Releasing a handle twice, or a count that is not held."""


class StaleMatch(Exception):
    """A match end can no longer be locked: its node was evicted or its window lost SWA."""


class TreeNode:
    """One radix-tree node. Invariants (checked by `RadixTree.check_integrity`):

    - `len(key) == len(value)`, a positive multiple of the page size (root: 0);
    - `children[k]` has `key[:page] == k` and `parent is self`;
    - `full_lock >= swa_lock >= 0`; `swa_lock > 0` implies `swa_live`; a full-locked
      node's parent is full-locked (locks run to the root, which is always locked);
    - `lockers` maps each live `LockHandle` holding this node to whether it also holds
      the SWA count, so `full_lock == len(lockers)` and `swa_lock == sum(lockers)`
      (root excepted: its counts are a permanent 1 and it has no lockers).
    """

    __slots__ = (
        "parent", "children", "key", "value", "start", "swa_live",
        "full_lock", "swa_lock", "full_time", "swa_time", "lockers",
        "in_tree", "host_full", "host_swa", "hits", "host_time", "host_pins", "anchored",
    )

    def __init__(
        self,
        parent: TreeNode | None,
        key: tuple[int, ...],
        value: torch.Tensor,
        start: int,
        swa_live: bool,
    ) -> None:
        self.parent = parent
        self.children: dict[tuple[int, ...], TreeNode] = {}
        self.key = key
        self.value: torch.Tensor | None = value
        self.start = start
        self.swa_live = swa_live
        self.full_lock = 0
        self.swa_lock = 0
        self.full_time = 0
        self.swa_time = 0
        self.lockers: dict[LockHandle, bool] = {}
        self.in_tree = True
        self.host_full: torch.Tensor | None = None  # int64 [len // page] host page ids
        self.host_swa: torch.Tensor | None = None
        self.hits = 0  # inserts and admitted hits through this node (backup policy)
        self.host_time = 0
        self.host_pins = 0  # > 0: a load-back or backup in flight needs its host pages
        self.anchored = False  # in the window of a prompt or finish end: keeps host SWA

    @property
    def end(self) -> int:
        return self.start + len(self.key)

    @property
    def alive(self) -> bool:
        return self.in_tree

    @property
    def on_device(self) -> bool:
        return self.value is not None

    @property
    def backed_up(self) -> bool:
        return self.host_full is not None

    def has_swa(self) -> bool:
        """SWA KV for the node's positions exists on the device or on the host."""
        return self.swa_live or self.host_swa is not None

    def __len__(self) -> int:
        return len(self.key)

    def __repr__(self) -> str:
        state = ("live" if self.swa_live else "tomb") if self.on_device else "off"
        host = "" if self.host_full is None else (" host" if self.host_swa is not None
                                                  else " host-tomb")
        return (
            f"TreeNode([{self.start}, {self.end}) {state}{host} lock={self.full_lock}/"
            f"{self.swa_lock}{'' if self.alive else ' dead'})"
        )


@dataclass(frozen=True)
class MatchEnd:
    """An end handle: prefix length `prefix_len` reached through `node`.

    `node` covers position `prefix_len - 1` when it was returned (or is the root and
    `prefix_len == 0`). Later splits move the lower part of a node into the same
    object (its `start` grows), so `RadixTree.lock` resolves the end by walking up
    from `node` to the node that covers `prefix_len - 1`.
    """

    node: TreeNode
    prefix_len: int


@dataclass(frozen=True)
class MatchResult:
    """Result of a read-only match.

    - `prefix_len`: deepest usable, page-aligned prefix: full KV for `[0, P)` and live
      SWA for `[max(0, P - (W - 1)), P)`.
    - `full_slots`: int64 tensor of the tree's full slots for positions `[0, P)`.
    - `end`: the end to pass to `lock` (None only from `ChunkCache`).
    - `full_only_len`: page-aligned length the tree holds full KV for, ignoring SWA
      (`>= prefix_len`); `full_only_len - prefix_len` is "full KV present but window
      missing". With a host tier, KV on the host counts.
    - `host_prefix_len` / `host_end`: the deepest end usable when KV on the host
      counts too (full KV on the device or the host for `[0, P)`, SWA on either for
      the window); `host_prefix_len >= prefix_len`, and `host_end` is None when it
      adds nothing (no host tier, or the device already reaches as far).
    """

    prefix_len: int
    full_slots: torch.Tensor
    end: MatchEnd | None
    full_only_len: int
    host_prefix_len: int = 0
    host_end: MatchEnd | None = None

    @property
    def host_extension(self) -> int:
        """Tokens a load-back would add to the device hit."""
        return max(0, self.host_prefix_len - self.prefix_len)


@dataclass(frozen=True)
class InsertResult:
    """Result of `RadixTree.insert` of a sequence of length `prefix_len`.

    - `full_slots`: the tree's full slots for `[0, prefix_len)`; the caller rewrites
      its request row with them (they differ from its own where it deduplicated).
    - `end`: the end at `prefix_len`, ready to lock.
    - `dedup_len`: tokens of the request's pages freed because the tree had them.
    - `revived_len`: tokens of tombstones that adopted the request's SWA pages.
    - `new_len`: tokens of new nodes (the request's pages now owned by the tree).
    """

    prefix_len: int
    full_slots: torch.Tensor
    end: MatchEnd
    dedup_len: int
    revived_len: int
    new_len: int


@dataclass(eq=False)
class LockHandle:
    """What one `lock` raised: a full count on each node of `full_nodes` and an SWA
    count on each node of `swa_nodes` (a subset). `prefix_len` is the locked end and
    `end_node` the node ending there (root for 0).

    A split registers the new upper node in every handle that held the split node
    (full count; SWA count iff the upper part overlaps this handle's window), so
    `unlock` replays exactly what this handle holds.
    """

    prefix_len: int
    end_node: TreeNode
    full_nodes: list[TreeNode] = field(default_factory=list)
    swa_nodes: list[TreeNode] = field(default_factory=list)
    released: bool = False
    owner: object = None  # the tree that issued it
