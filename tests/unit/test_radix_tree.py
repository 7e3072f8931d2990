"""RadixTree unit tests: exact lengths, slots and pool deltas (acceptance 1-8).

Fresh allocators hand out pages 1, 2, 3, ... in order, so a request of n tokens
allocated first gets slots [p, p + n) (page size p).
"""

from __future__ import annotations

import pytest
import torch

from swakv.cache import LockError, RadixTree, StaleMatch
from swakv.memory import Need, SWAAllocator
from swakv.memory.pages import max_frontier, page_ceil

# (page_size, window): windows below, at and above the page size
CONFIGS = [(1, 1), (1, 3), (4, 1), (4, 3), (4, 4), (4, 9), (16, 8), (16, 16), (16, 40)]
BASE = list(range(1000, 3000))
OTHER = list(range(5000, 7000))
THIRD = list(range(8000, 10000))


def make(p: int, w: int, full_pages: int = 200, swa_pages: int = 200) -> RadixTree:
    return RadixTree(SWAAllocator(full_pages, swa_pages, p), p, w)


def request(tree: RadixTree, toks: list[int], frontier: int = 0) -> torch.Tensor:
    """A request's fresh slots for toks, SWA freed below `frontier`."""
    slots = tree.allocator.alloc(len(toks))
    if frontier:
        tree.allocator.free_swa(slots[:frontier])
    return slots


def add(tree: RadixTree, toks: list[int], frontier: int = 0):
    slots = request(tree, toks, frontier)
    return slots, tree.insert(toks, slots, 0, frontier)


def reference_prefix(live: list[bool], limit: int, p: int, w: int) -> int:
    """Deepest page-aligned P <= limit whose window [P - (W - 1), P) is all live."""
    return max(q for q in range(0, limit + 1, p) if all(live[max(0, q - (w - 1)) : q]))


@pytest.mark.parametrize("p,w", CONFIGS)
def test_insert_then_match(p: int, w: int) -> None:
    tree = make(p, w)
    a = BASE[: 6 * p]
    slots, res = add(tree, a)
    assert torch.equal(slots, torch.arange(p, 7 * p))
    assert res.new_len == 6 * p and res.dedup_len == 0 and torch.equal(res.full_slots, slots)
    m = tree.match(a)  # whole
    assert (m.prefix_len, m.full_only_len) == (6 * p, 6 * p)
    assert torch.equal(m.full_slots, slots)
    m = tree.match(a[: 3 * p + p - 1])  # partial: page floored
    assert (m.prefix_len, m.full_only_len) == (3 * p, 3 * p)
    assert torch.equal(m.full_slots, slots[: 3 * p])
    diverge = a[: 2 * p + p // 2] + [7] * (3 * p)  # divergence inside page 2
    m = tree.match(diverge)
    assert (m.prefix_len, m.full_only_len) == (2 * p, 2 * p)
    assert torch.equal(m.full_slots, slots[: 2 * p])
    m = tree.match([7] * (4 * p))  # none
    assert (m.prefix_len, m.full_only_len, m.full_slots.numel()) == (0, 0, 0)
    b = a[: 3 * p] + OTHER[: 3 * p]  # shared-prefix branch
    slots_b, res_b = add(tree, b)
    assert torch.equal(slots_b, torch.arange(7 * p, 13 * p))
    expect_b = torch.cat((slots[: 3 * p], slots_b[3 * p :]))
    assert torch.equal(res_b.full_slots, expect_b)
    assert (res_b.dedup_len, res_b.new_len) == (3 * p, 3 * p)
    for toks, want in ((a, slots), (b, expect_b)):
        m = tree.match(toks)
        assert (m.prefix_len, m.full_only_len) == (6 * p, 6 * p)
        assert torch.equal(m.full_slots, want)
    tree.check_integrity()


@pytest.mark.parametrize("p,w", CONFIGS)
def test_dedup_frees_exactly_the_duplicates(p: int, w: int) -> None:
    tree = make(p, w)
    a = BASE[: 6 * p]
    slots_a, _ = add(tree, a)
    dup = request(tree, a)
    before = tree.allocator.available()
    res = tree.insert(a, dup, 0, 0)
    assert tree.allocator.available() - before == Need(6 * p, 6 * p)
    assert torch.equal(res.full_slots, slots_a) and res.dedup_len == 6 * p and res.new_len == 0
    c = a[: 4 * p] + OTHER[: 2 * p]
    slots_c = request(tree, c)
    before = tree.allocator.available()
    res = tree.insert(c, slots_c, 0, 0)
    assert tree.allocator.available() - before == Need(4 * p, 4 * p)
    assert torch.equal(res.full_slots, torch.cat((slots_a[: 4 * p], slots_c[4 * p :])))
    tree.check_integrity()


def frontier_case(p: int, w: int) -> tuple[list[int], int]:
    """A prompt of page_ceil(W) + 4 pages and the largest frontier of that request."""
    n = page_ceil(w, p) + 4 * p
    return BASE[:n], max_frontier(n, w, p)


@pytest.mark.parametrize("p,w", CONFIGS)
def test_frontier_span_becomes_tombstones(p: int, w: int) -> None:
    tree = make(p, w)
    toks, f = frontier_case(p, w)
    n = len(toks)
    assert f > 0
    before = tree.allocator.available()
    slots, res = add(tree, toks, frontier=f)
    assert tree.allocator.available() - before == Need(-n, -(n - f))
    assert tree.swa_evictable == n - f and tree.full_evictable == n
    live = [q >= f for q in range(n)]
    for limit in range(0, n + 1, p):
        m = tree.match(toks[:limit])
        assert m.prefix_len == reference_prefix(live, limit, p, w), limit
        assert m.full_only_len == limit
        assert torch.equal(m.full_slots, slots[: m.prefix_len])
    assert tree.match(toks).prefix_len == n  # the request's own end keeps its window
    tree.check_integrity()


@pytest.mark.parametrize("p,w", CONFIGS)
@pytest.mark.parametrize("locked", [False, True])
def test_tombstone_revival(p: int, w: int, locked: bool) -> None:
    tree = make(p, w)
    toks, f = frontier_case(p, w)
    n = len(toks)
    slots_a, res_a = add(tree, toks, frontier=f)
    handle = tree.lock(res_a.end) if locked else None  # others' rows hold these slots
    slots_b = request(tree, toks)  # a later request computed everything itself
    swa_b = tree.allocator.translate(slots_b)
    before = tree.allocator.available()
    res = tree.insert(toks, slots_b, 0, 0)
    # all of B's full pages are duplicates; its SWA below f moved into the tree
    assert tree.allocator.available() - before == Need(n, n - f)
    assert (res.revived_len, res.dedup_len, res.new_len) == (f, n, 0)
    assert torch.equal(res.full_slots, slots_a)
    assert torch.equal(tree.allocator.translate(slots_a[:f]), swa_b[:f])
    for limit in range(0, n + 1, p):
        m = tree.match(toks[:limit])
        assert (m.prefix_len, m.full_only_len) == (limit, limit)
        assert torch.equal(m.full_slots, slots_a[:limit])
    tree.check_integrity()
    if handle is not None:
        tree.unlock(handle)
        tree.check_integrity()


@pytest.mark.parametrize("p,w", CONFIGS)
def test_partial_revival_splits_at_the_frontier(p: int, w: int) -> None:
    tree = make(p, w)
    toks, f = frontier_case(p, w)
    if f < 2 * p:
        pytest.skip("needs a tombstone of at least two pages")
    n, f2 = len(toks), f - p
    add(tree, toks, frontier=f)
    before = tree.allocator.available()
    _, res = add(tree, toks, frontier=f2)  # B still holds SWA for [f2, n)
    assert res.revived_len == f - f2
    # B's pages all go back except the SWA the revived span [f2, f) adopted
    assert tree.allocator.available() - before == Need(0, -(f - f2))
    live = [q >= f2 for q in range(n)]
    for limit in range(0, n + 1, p):
        assert tree.match(toks[:limit]).prefix_len == reference_prefix(live, limit, p, w)
    tree.check_integrity()


@pytest.mark.parametrize("p,w", CONFIGS)
def test_window_capping(p: int, w: int) -> None:
    tree = make(p, w)
    cap = page_ceil(w, p)
    toks = BASE[: cap + 2 * p]
    _, res = add(tree, toks)
    leaf = res.end.node
    assert (leaf.start, len(leaf)) == (2 * p, cap) and leaf.swa_live
    assert leaf.parent is not tree.root and len(leaf.parent) == 2 * p
    assert leaf.parent.parent is tree.root
    handle = tree.lock(res.end)
    assert tree.swa_protected == (cap if w > 1 else 0)
    assert tree.full_protected == cap + 2 * p
    tree.unlock(handle)
    assert tree.swa_protected == tree.full_protected == 0
    for n in {cap, max(p, cap - p)}:  # at most one window: not split
        other = make(p, w)
        _, r = add(other, OTHER[:n])
        assert r.end.node.parent is other.root and len(r.end.node) == n
        other.check_integrity()
    tree.check_integrity()


@pytest.mark.parametrize("p,w", CONFIGS)
def test_window_aware_lru(p: int, w: int) -> None:
    tree = make(p, w)
    cap = page_ceil(w, p)
    x = BASE[: 2 * cap]  # rest [0, cap) + leaf [cap, 2cap)
    s = x[:cap] + OTHER[: 3 * cap]  # side branch below [0, cap): [cap, 3cap) + [3cap, 4cap)
    d = x + THIRD[: 3 * cap]  # deep path below x's leaf: [2cap, 4cap) + [4cap, 5cap)
    add(tree, x)
    add(tree, s)
    _, res_d = add(tree, d)
    rest = tree.root.children[tuple(x[:p])]
    x_leaf = rest.children[tuple(x[cap : cap + p])]
    old = (rest.swa_time, x_leaf.swa_time)
    m = tree.match(d)
    assert m.prefix_len == 5 * cap
    tree.unlock(tree.lock(m.end))  # a hit
    now = tree._clock
    path = []
    node = res_d.end.node
    while node is not tree.root:
        path.append(node)
        node = node.parent
    assert all(n.full_time == now for n in path)  # the full LRU refreshes the whole path
    refreshed = [n for n in path if n.swa_time == now]
    assert all(n.end > 5 * cap - w - p for n in refreshed)  # only the last W + page tokens
    assert (rest.swa_time, x_leaf.swa_time) == old
    before = tree.allocator.available()
    freed = tree.evict(Need(0, 2 * cap))  # SWA pressure: the old ancestors go first
    assert freed == Need(0, 2 * cap) and tree.allocator.available() - before == freed
    assert not rest.swa_live and not x_leaf.swa_live and rest.alive and x_leaf.alive
    assert tree.match(s).prefix_len == 4 * cap  # side branch still fully matchable
    assert tree.match(d).prefix_len == 5 * cap
    m = tree.match(x)
    assert (m.prefix_len, m.full_only_len) == ((2 * cap if w == 1 else 0), 2 * cap)
    tree.check_integrity()


def two_leaves(p: int, w: int) -> tuple[RadixTree, int, list[int], list[int]]:
    """root -> n1 [0, cap) -> {l1 = a's leaf, l2 = b's leaf}, each cap tokens."""
    tree = make(p, w)
    cap = page_ceil(w, p)
    a, b = BASE[: 2 * cap], BASE[:cap] + OTHER[:cap]
    add(tree, a)
    add(tree, b)
    return tree, cap, a, b


@pytest.mark.parametrize("p,w", CONFIGS)
def test_swa_eviction_tombstones_and_locked_leaf(p: int, w: int) -> None:
    tree, cap, a, b = two_leaves(p, w)
    handle = tree.lock(tree.match(b).end)  # full-locks n1 and l2; SWA-locks l2 (W > 1)
    before = tree.allocator.available()
    freed = tree.evict(Need(0, 10**6))
    # n1 (internal) and l1 (unlocked leaf, SWA-only request) become tombstones; l2 keeps
    # its SWA unless W == 1 (empty window: a full-locked leaf loses only its SWA)
    assert freed == Need(0, 3 * cap if w == 1 else 2 * cap)
    assert tree.allocator.available() - before == freed  # no full page freed
    assert tree.num_nodes == 3 and tree.full_evictable == cap
    assert tree.match(a).prefix_len == (2 * cap if w == 1 else 0)
    assert tree.match(b).prefix_len == 2 * cap
    tree.unlock(handle)
    tree.check_integrity()


@pytest.mark.parametrize("p,w", CONFIGS)
def test_mixed_eviction_removes_unlocked_leaves(p: int, w: int) -> None:
    tree, cap, a, b = two_leaves(p, w)
    handle = tree.lock(tree.match(a[:cap]).end)  # pins n1 (full and SWA)
    before = tree.allocator.available()
    freed = tree.evict(Need(1, 10**6))
    # l1 by the full LRU, l2 by the SWA LRU; with W == 1 n1's SWA is not pinned either
    assert freed == Need(2 * cap, 3 * cap if w == 1 else 2 * cap)
    assert tree.allocator.available() - before == freed
    assert tree.num_nodes == 1 and tree.match(b).prefix_len == cap
    tree.unlock(handle)
    tree.check_integrity()


@pytest.mark.parametrize("p,w", CONFIGS)
def test_full_eviction_frees_leaves_with_swa(p: int, w: int) -> None:
    tree, cap, a, b = two_leaves(p, w)
    before = tree.allocator.available()
    assert tree.evict(Need(1, 0)) == Need(cap, cap)  # oldest leaf: a's
    assert tree.allocator.available() - before == Need(cap, cap)
    assert tree.match(a).prefix_len == cap and tree.match(b).prefix_len == 2 * cap
    assert tree.evict(Need(10**6, 0)) == Need(2 * cap, 2 * cap)  # cascades to n1
    assert tree.num_nodes == 0 and tree.allocator.available() == tree.allocator.total()
    tree.check_integrity()


@pytest.mark.parametrize("p,w", CONFIGS)
def test_locks_balanced_across_splits(p: int, w: int) -> None:
    tree = make(p, w, full_pages=400, swa_pages=400)
    big = 4 * page_ceil(w, p)  # several nodes after capping; splits land anywhere
    a = BASE[:big]
    _, res = add(tree, a)
    h1 = tree.lock(res.end)
    h2 = tree.lock(tree.match(a[: big // 2]).end)  # lock-time split
    for k in range(p, big, 3 * p):  # later inserts split under the locks
        add(tree, a[:k] + OTHER[: 2 * p])
        tree.check_integrity()
    h3 = tree.lock(tree.match(a[:p]).end)
    tree.unlock(h1)
    tree.check_integrity()
    with pytest.raises(LockError):
        tree.unlock(h1)
    tree.unlock(h2)
    tree.unlock(h3)
    assert tree.full_protected == tree.swa_protected == 0
    assert all(n.full_lock == n.swa_lock == 0 for n in tree.nodes())
    with pytest.raises(LockError):
        tree.unlock(h3)
    tree.check_integrity()
    assert tree.evict(Need(10**6, 10**6)).full > 0
    assert tree.allocator.available() == tree.allocator.total()


def test_foreign_handle_and_stale_end() -> None:
    tree, other = make(4, 4), make(4, 4)
    _, res = add(tree, BASE[:8])
    _, res2 = add(other, BASE[:8])
    h = other.lock(res2.end)
    with pytest.raises(LockError):
        tree.unlock(h)
    m = tree.match(BASE[:8])
    tree.evict(Need(0, 10**6))  # window tombstoned between match and lock
    with pytest.raises(StaleMatch):
        tree.lock(m.end)
    tree.evict(Need(10**6, 0))  # node gone
    with pytest.raises(StaleMatch):
        tree.lock(m.end)
    assert tree.full_protected == tree.swa_protected == 0
    tree.check_integrity()


@pytest.mark.parametrize("p,w", CONFIGS)
def test_lock_pins_only_the_swa_tail_as_the_end_moves(p: int, w: int) -> None:
    """A decoding request re-locks one page further each time: the SWA lock covers
    the window's pages within the tail [page_floor(P - W), P), never the older part
    of a big node (which stays evictable)."""
    tree = make(p, w, full_pages=400, swa_pages=400)
    cap = page_ceil(w, p)
    toks = BASE[: cap + 2 * p]
    slots, res = add(tree, toks)
    handle = tree.lock(res.end)
    for extra in range(1, 4):
        longer = BASE[: len(toks) + extra * p]
        more = tree.allocator.alloc_extend(len(longer) - p, len(longer), None)
        res = tree.insert(longer, torch.cat((res.full_slots, more)), len(longer) - p, 0)
        new_handle = tree.lock(res.end)
        tree.unlock(handle)
        handle = new_handle
        plen = len(longer)
        # at least the pages of the W - 1 positions the next query reads, at most the
        # page-aligned tail [page_floor(P - W), P); W = 1 needs no earlier key
        needed = plen - (plen - (w - 1)) // p * p
        tail = plen - (max(0, plen - w) // p * p)
        if w == 1:
            assert tree.swa_protected == 0
        else:
            assert needed <= tree.swa_protected <= tail
        assert tree.full_protected == plen
        tree.check_integrity()
    tree.unlock(handle)
    assert tree.swa_protected == 0 and tree.full_protected == 0
    tree.evict(tree.allocator.total())
    tree.check_integrity()
    assert tree.allocator.available() == tree.allocator.total()
