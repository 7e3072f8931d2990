"""Consistency checks of the radix tree (DESIGN §4, §5), recomputing everything kept
incrementally. Cost is linear in the tree size: for tests and debugging only."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from swakv.cache.node import TreeNode
    from swakv.cache.tree import RadixTree


def check_tree(tree: RadixTree) -> None:
    """Raise AssertionError on the first broken invariant.

    Device: parent/child links and keys; node starts; value lengths; each node's SWA
    value equals the mapping of its full value (live: every page mapped, tombstone:
    every page maps to 0); no full page held twice or free; lock counts (`full >= swa
    >= 0`, SWA-locked nodes live, locks closed upwards, only on device nodes, lockers
    agree with counts and handles); root locked; recomputed sizes; LRU membership.
    Host: every node is on the device or backed up; device-resident and backed-up
    nodes each form a root-connected subtree; host page lists have one page per node
    page, host SWA only with host full; every host page has exactly one owner (a node
    or the host free list).
    """
    root = tree.root
    assert root.full_lock >= 1 and root.swa_lock >= 1, "root not locked"
    assert root.parent is None and len(root.key) == 0
    sizes = dict.fromkeys(("fp", "fe", "sp", "se", "hf", "hs"), 0)
    dev_pages: list[torch.Tensor] = []
    host_full: list[torch.Tensor] = []
    host_swa: list[torch.Tensor] = []
    count = 0
    lru_ok = {"full": tree.full_lru.valid_nodes(), "swa": tree.swa_lru.valid_nodes(),
              "host": tree.host_lru.valid_nodes()}
    stack = [root]
    while stack:
        node = stack.pop()
        for first, child in node.children.items():
            count += 1
            _check_links(tree, node, first, child)
            _check_device(tree, node, child, dev_pages)
            _check_host(tree, node, child, host_full, host_swa)
            _check_locks(node, child)
            k = len(child.key)
            if child.value is not None:
                sizes["fp" if child.full_lock else "fe"] += k
            if child.swa_live:
                sizes["sp" if child.swa_lock else "se"] += k
            if child.host_full is not None:
                sizes["hf"] += k
                sizes["hs"] += k if child.host_swa is not None else 0
            _check_lru(tree, child, lru_ok)
            stack.append(child)
    assert count == tree.num_nodes, f"num_nodes {tree.num_nodes} != {count}"
    got = (tree.full_protected, tree.full_evictable, tree.swa_protected, tree.swa_evictable,
           tree.host_full_tokens, tree.host_swa_tokens)
    want = tuple(sizes[k] for k in ("fp", "fe", "sp", "se", "hf", "hs"))
    assert got == want, f"sizes (fp, fe, sp, se, hf, hs) {got} != recomputed {want}"
    if dev_pages:
        pages = torch.cat(dev_pages)
        assert int(torch.unique(pages).numel()) == int(pages.numel()), "a full page in two nodes"
        assert not bool(tree.allocator.full.pages.is_free_mask()[pages].any()), "tree holds a free page"
    if tree.host is not None:
        _check_host_owners(tree, host_full, host_swa)
    else:
        assert not host_full and not host_swa, "host copies without a host tier"


def _check_links(tree: RadixTree, node: TreeNode, first: tuple, child: TreeNode) -> None:
    p, k = tree.page, len(child.key)
    assert child.parent is node, f"{child}: wrong parent"
    assert child.in_tree, f"{child}: removed node in tree"
    assert k > 0 and k % p == 0, f"{child}: key length {k}"
    assert child.key[:p] == first, f"{child}: keyed by the wrong first page"
    assert child.start == node.end, f"{child}: start {child.start} != {node.end}"
    assert child.value is not None or child.host_full is not None, (
        f"{child}: neither on the device nor backed up")


def _check_device(tree: RadixTree, node: TreeNode, child: TreeNode,
                  dev_pages: list[torch.Tensor]) -> None:
    p, k = tree.page, len(child.key)
    if child.value is None:
        assert not child.swa_live and not child.full_lock, f"{child}: off-device state"
        return
    assert node.parent is None or node.value is not None, (
        f"{child}: on the device under a parent that is not")
    assert int(child.value.numel()) == k, f"{child}: value length"
    pages = child.value[::p] // p
    if p > 1:
        expect = pages.repeat_interleave(p) * p + torch.arange(p).repeat(k // p)
        assert torch.equal(child.value, expect), f"{child}: pages not contiguous"
    mapped = tree.allocator.full_to_swa_page[pages] > 0
    if child.swa_live:
        assert bool(mapped.all()), f"{child}: live node with unmapped pages"
    else:
        assert not bool(mapped.any()), f"{child}: tombstone with mapped pages"
    dev_pages.append(pages)


def _check_host(tree: RadixTree, node: TreeNode, child: TreeNode,
                host_full: list[torch.Tensor], host_swa: list[torch.Tensor]) -> None:
    k = len(child.key) // tree.page
    if child.host_full is None:
        assert child.host_swa is None, f"{child}: host SWA without host full"
        return
    assert node.parent is None or node.host_full is not None, (
        f"{child}: backed up under a parent that is not")
    assert int(child.host_full.numel()) == k, f"{child}: host full pages"
    host_full.append(child.host_full)
    if child.host_swa is not None:
        assert int(child.host_swa.numel()) == k, f"{child}: host SWA pages"
        host_swa.append(child.host_swa)


def _check_locks(node: TreeNode, child: TreeNode) -> None:
    assert child.full_lock >= child.swa_lock >= 0, f"{child}: lock counts"
    assert child.swa_lock == 0 or child.swa_live, f"{child}: SWA-locked tombstone"
    assert child.full_lock == 0 or node.full_lock > 0, f"{child}: lock not closed upward"
    assert child.full_lock == len(child.lockers), f"{child}: full lockers"
    assert child.swa_lock == sum(child.lockers.values()), f"{child}: SWA lockers"
    assert child.host_pins == 0, f"{child}: host pin left after a call"
    for handle, swa in child.lockers.items():
        assert not handle.released, f"{child}: released handle still registered"
        assert any(n is child for n in handle.full_nodes), f"{child}: handle lost node"
        assert swa == any(n is child for n in handle.swa_nodes), f"{child}: SWA handle"


def _check_lru(tree: RadixTree, child: TreeNode, ok: dict[str, set[int]]) -> None:
    if tree._full_evictable_leaf(child):
        assert id(child) in ok["full"], f"{child}: evictable leaf missing from full LRU"
    if tree._swa_evictable(child):
        assert id(child) in ok["swa"], f"{child}: live SWA node missing from SWA LRU"
    if tree.host is not None and tree._host_evictable(child):
        assert id(child) in ok["host"], f"{child}: evictable host node missing from host LRU"


def _check_host_owners(tree: RadixTree, host_full: list[torch.Tensor],
                       host_swa: list[torch.Tensor]) -> None:
    pool = tree.host.pool  # type: ignore[union-attr]
    pool.check_integrity()
    for name, lists, free in (("full", host_full, pool.full), ("SWA", host_swa, pool.swa)):
        owned = torch.cat(lists) if lists else torch.zeros(0, dtype=torch.int64)
        assert int(torch.unique(owned).numel()) == int(owned.numel()), (
            f"a host {name} page in two nodes")
        assert not bool(free.is_free_mask()[owned].any()), f"tree holds a free host {name} page"
        assert free.num_free + int(owned.numel()) == free.num_pages, f"host {name} pages leaked"
