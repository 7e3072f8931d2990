"""Consistency checks of the radix tree (DESIGN §4), recomputing everything kept
incrementally. Cost is linear in the tree size: for tests and debugging only."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from swakv.cache.tree import RadixTree


def check_tree(tree: RadixTree) -> None:
    """Raise AssertionError on the first broken invariant.

    Checks: parent/child links and keys; node starts; value lengths; each node's SWA
    value equals the mapping of its full value (live: every page mapped, tombstone:
    every page maps to 0); no full page held twice or free; lock counts
    (`full >= swa >= 0`, SWA-locked nodes live, locks closed upwards, lockers agree
    with counts and handles); root locked; recomputed sizes; LRU membership (every
    eligible node has a valid heap entry).
    """
    p = tree.page
    root = tree.root
    alloc = tree.allocator
    assert root.full_lock >= 1 and root.swa_lock >= 1, "root not locked"
    assert root.parent is None and len(root.key) == 0
    sizes = {"fp": 0, "fe": 0, "sp": 0, "se": 0}
    all_pages: list[torch.Tensor] = []
    count = 0
    full_ok = tree.full_lru.valid_nodes()
    swa_ok = tree.swa_lru.valid_nodes()
    stack = [root]
    while stack:
        node = stack.pop()
        for first, child in node.children.items():
            count += 1
            k = len(child.key)
            assert child.parent is node, f"{child}: wrong parent"
            assert child.value is not None, f"{child}: dead node in tree"
            assert k > 0 and k % p == 0, f"{child}: key length {k}"
            assert child.key[:p] == first, f"{child}: keyed by the wrong first page"
            assert int(child.value.numel()) == k, f"{child}: value length"
            assert child.start == node.end, f"{child}: start {child.start} != {node.end}"
            pages = child.value[::p] // p
            if p > 1:
                expect = pages.repeat_interleave(p) * p + torch.arange(p).repeat(k // p)
                assert torch.equal(child.value, expect), f"{child}: pages not contiguous"
            mapped = alloc.full_to_swa_page[pages] > 0
            if child.swa_live:
                assert bool(mapped.all()), f"{child}: live node with unmapped pages"
            else:
                assert not bool(mapped.any()), f"{child}: tombstone with mapped pages"
            all_pages.append(pages)
            assert child.full_lock >= child.swa_lock >= 0, f"{child}: lock counts"
            assert child.swa_lock == 0 or child.swa_live, f"{child}: SWA-locked tombstone"
            assert child.full_lock == 0 or node.full_lock > 0, f"{child}: lock not closed upward"
            assert child.full_lock == len(child.lockers), f"{child}: full lockers"
            assert child.swa_lock == sum(child.lockers.values()), f"{child}: SWA lockers"
            for handle, swa in child.lockers.items():
                assert not handle.released, f"{child}: released handle still registered"
                assert any(n is child for n in handle.full_nodes), f"{child}: handle lost node"
                assert swa == any(n is child for n in handle.swa_nodes), f"{child}: SWA handle"
            key = ("fp" if child.full_lock else "fe")
            sizes[key] += k
            if child.swa_live:
                sizes["sp" if child.swa_lock else "se"] += k
            if tree._full_evictable_leaf(child):
                assert id(child) in full_ok, f"{child}: evictable leaf missing from full LRU"
            if tree._swa_evictable(child):
                assert id(child) in swa_ok, f"{child}: live SWA node missing from SWA LRU"
            stack.append(child)
    assert count == tree.num_nodes, f"num_nodes {tree.num_nodes} != {count}"
    got = (tree.full_protected, tree.full_evictable, tree.swa_protected, tree.swa_evictable)
    want = (sizes["fp"], sizes["fe"], sizes["sp"], sizes["se"])
    assert got == want, f"sizes (fp, fe, sp, se) {got} != recomputed {want}"
    if all_pages:
        pages = torch.cat(all_pages)
        assert int(torch.unique(pages).numel()) == int(pages.numel()), "a full page in two nodes"
        assert not bool(alloc.full.pages.is_free_mask()[pages].any()), "tree holds a free page"
