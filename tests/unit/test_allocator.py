"""Exact-slot unit tests for the single-pool allocators, SWAAllocator and ReqTable.

Fresh free lists hand out pages 1, 2, 3, ... in order and freed pages go to the back,
so every expected slot below is exact. Page k holds slots [k*P, (k+1)*P).
"""

from __future__ import annotations

import pytest
import torch
from test_allocator_state_machine import snapshot

from swakv.memory.allocator import (
    InvalidFree,
    KVInvariantError,
    OutOfKVMemory,
    PagedAllocator,
    PageFreeList,
    SWAAllocator,
    TokenAllocator,
)
from swakv.memory.pages import Need, max_frontier, swa_tail_len, swa_tail_start
from swakv.memory.req_table import NoFreeRow, ReqTable

PAGES = [1, 4, 16]
I64 = torch.int64


def t(xs) -> torch.Tensor:
    return torch.tensor(list(xs), dtype=I64)


def pslots(pages, P: int, n: int | None = None, start: int = 0) -> list[int]:
    """Slots of consecutive positions laid out over `pages`, from offset `start`."""
    out = [pg * P + o for pg in pages for o in range(P)]
    out = out[start:]
    return out if n is None else out[:n]




def mapping(a: SWAAllocator) -> dict[int, int]:
    return {f: s for f, s in enumerate(a.full_to_swa_page.tolist()) if s}


# ------------------------------------------------------------------- PageFreeList


def test_page_free_list_order_and_errors() -> None:
    fl = PageFreeList(5)
    assert fl.num_free == 5 and fl.free_pages().tolist() == [1, 2, 3, 4, 5]
    assert fl.take(2).tolist() == [1, 2]
    fl.give(t([2]))
    assert fl.free_pages().tolist() == [3, 4, 5, 2]
    assert fl.take(3).tolist() == [3, 4, 5]
    fl.check_integrity()
    for bad in ([2], [0], [6], [-1], [3, 2]):
        before = fl.free_pages().tolist()
        with pytest.raises(InvalidFree):
            fl.give(t(bad))
        assert fl.free_pages().tolist() == before
    with pytest.raises(AssertionError):
        fl.take(2)
    fl.give(t([]))
    fl.check_integrity()
    with pytest.raises(ValueError):
        PageFreeList(-1)


# ------------------------------------------------------------- single-pool allocators


def test_token_allocator_exact() -> None:
    a = TokenAllocator(6)
    slots, new = a.extend_slots(0, 3, None)
    assert slots.tolist() == [1, 2, 3] and new.tolist() == [1, 2, 3]
    slots, new = a.extend_slots(3, 4, 3)
    assert slots.tolist() == [4] and new.tolist() == [4]
    slots, new = a.decode_slots(t([4, 1]), t([4, 9]))
    assert slots.tolist() == [5, 6] and new.tolist() == [5, 6]
    assert a.available_tokens() == 0
    assert a.new_pages_for_extend(3, 7) == 4
    assert a.pages_of(t([3, 1])).tolist() == [3, 1]  # order kept
    with pytest.raises(InvalidFree):  # page size 1: a repeated slot is a repeated page
        a.pages_of(t([3, 3, 1]))
    a.pages.give(t([2, 5]))
    assert a.extend_slots(0, 2, None)[0].tolist() == [2, 5]
    a.pages.check_integrity()


# (prefix_len, seq_len, last_slot, expected slots, expected new pages) for page 4,
# on an allocator that has already handed out pages 1..3 (next fresh page: 4).
PAGED_EXTEND_CASES = [
    (0, 0, None, [], []),
    (0, 1, None, [16], [4]),
    (0, 4, None, [16, 17, 18, 19], [4]),
    (0, 6, None, [16, 17, 18, 19, 20, 21], [4, 5]),
    # docstring example: prefix 6 (last slot 13 on page 3) to 11
    (6, 11, 13, [14, 15, 16, 17, 18], [4]),
    (6, 7, 13, [14], []),
    (6, 8, 13, [14, 15], []),
    (5, 6, 12, [13], []),
    (4, 9, 11, [16, 17, 18, 19, 20], [4, 5]),
    (7, 13, 14, [15, 16, 17, 18, 19, 20], [4, 5]),
]


@pytest.mark.parametrize("prefix,seq,last,slots,new", PAGED_EXTEND_CASES)
def test_paged_allocator_extend_exact(prefix, seq, last, slots, new) -> None:
    a = PagedAllocator(8, 4)
    a.pages.take(3)
    got, got_new = a.extend_slots(prefix, seq, last)
    assert got.tolist() == slots
    assert got_new.tolist() == new
    assert a.new_pages_for_extend(prefix, seq) == len(new)
    assert a.pages.num_free == 5 - len(new)
    a.pages.check_integrity()


def test_paged_allocator_decode_and_errors() -> None:
    a = PagedAllocator(8, 4)
    a.pages.take(3)
    # lens 3, 4, 8, 5: positions 3 (page continues), 4 and 8 (new pages), 5 (continues)
    slots, new = a.decode_slots(t([3, 4, 8, 5]), t([6, 11, 15, 12]))
    assert slots.tolist() == [7, 16, 20, 13] and new.tolist() == [4, 5]
    with pytest.raises(ValueError):
        a.extend_slots(3, 5, None)
    with pytest.raises(ValueError):
        PagedAllocator(4, 1)
    assert a.pages_of(t([5, 7, 20, 21])).tolist() == [1, 5]  # slots of one page together
    with pytest.raises(InvalidFree):  # a page fills in order: 7 then 4 names a slot again
        a.pages_of(t([7, 4, 20, 21]))


# ------------------------------------------------------------------ SWAAllocator basics

F, S = 8, 6  # usable full / SWA pages of the allocators below


def make(P: int) -> SWAAllocator:
    a = SWAAllocator(F, S, P)
    a.check_integrity()
    return a


def diverge(a: SWAAllocator) -> torch.Tensor:
    """Make full and SWA page ids differ: full pages 1, 2 with only page 2 -> SWA page 1."""
    P = a.page_size
    x = a.alloc_extend_swa_tail(2 * P, P)
    assert x.tolist() == pslots([1, 2], P)
    assert mapping(a) == {2: 1}
    a.check_integrity()
    return x


@pytest.mark.parametrize("P", PAGES)
def test_fresh_sizes(P: int) -> None:
    a = make(P)
    assert a.total() == Need(F * P, S * P)
    assert a.available() == Need(F * P, S * P)
    assert a.full_available() == F * P and a.swa_available() == S * P
    assert a.num_full_slots == (F + 1) * P and a.num_swa_slots == (S + 1) * P
    assert not bool(a.full.pages.is_free_mask()[0]) and not bool(a.swa.is_free_mask()[0])
    with pytest.raises(ValueError):
        SWAAllocator(2, 2, 0)


# (P, n tokens, expected slots, expected mapping, available after)
ALLOC_CASES = [
    (1, 1, [1], {1: 1}, Need(7, 5)),
    (1, 3, [1, 2, 3], {1: 1, 2: 2, 3: 3}, Need(5, 3)),
    (4, 1, [4], {1: 1}, Need(28, 20)),
    (4, 4, [4, 5, 6, 7], {1: 1}, Need(28, 20)),
    (4, 6, [4, 5, 6, 7, 8, 9], {1: 1, 2: 2}, Need(24, 16)),
    (16, 17, list(range(16, 33)), {1: 1, 2: 2}, Need(96, 64)),
    (16, 0, [], {}, Need(128, 96)),
]


@pytest.mark.parametrize("P,n,slots,mp,avail", ALLOC_CASES)
def test_alloc_exact(P, n, slots, mp, avail) -> None:
    a = make(P)
    got = a.alloc(n)
    assert got.tolist() == slots
    assert mapping(a) == mp
    assert a.available() == avail
    assert a.translate(got).tolist() == slots  # fresh pools: same page ids
    a.check_integrity()


@pytest.mark.parametrize("P", PAGES)
def test_alloc_extend_from_zero_and_continue_partial_page(P: int) -> None:
    a = make(P)
    diverge(a)  # full pages 1, 2 taken; SWA page 1 taken (mapped from full page 2)
    first = P + max(1, P // 2)  # 2, 6, 24: non-aligned for P > 1
    r0 = a.alloc_extend(0, first, None)
    # full pages 3, 4 -> SWA pages 2, 3
    assert r0.tolist() == pslots([3, 4], P, first)
    assert mapping(a) == {2: 1, 3: 2, 4: 3}
    assert a.translate(r0).tolist() == pslots([2, 3], P, first)
    a.check_integrity()
    # continue from the non-aligned prefix: rest of page 4 (and SWA page 3), then page 5
    second = first + P + 1
    r1 = a.alloc_extend(first, second, int(r0[-1]))
    new_pages = -(-second // P)  # pages of the request now: 3 (P > 1) or 4 (P == 1)
    assert r1.tolist() == pslots(range(3, 3 + new_pages), P, second - first, start=first)
    assert mapping(a) == {2: 1, **{3 + i: 2 + i for i in range(new_pages)}}
    swa = range(2, 2 + new_pages)
    assert a.translate(r1).tolist() == pslots(swa, P, second - first, start=first)
    assert a.is_swa_mapped(torch.cat((r0, r1))).all()
    assert a.available() == Need((F - 2 - new_pages) * P, (S - 1 - new_pages) * P)
    a.check_integrity()


# Literal version of the above for page 4 (first = 6, second = 11).
def test_alloc_extend_literal_page4() -> None:
    a = make(4)
    diverge(a)
    r0 = a.alloc_extend(0, 6, None)
    assert r0.tolist() == [12, 13, 14, 15, 16, 17]
    assert a.translate(r0).tolist() == [8, 9, 10, 11, 12, 13]
    r1 = a.alloc_extend(6, 11, 17)
    assert r1.tolist() == [18, 19, 20, 21, 22]
    assert a.translate(r1).tolist() == [14, 15, 16, 17, 18]
    # within-page continuation takes no page at all
    r2 = a.alloc_extend(11, 12, 22)
    assert r2.tolist() == [23] and a.translate(r2).tolist() == [19]
    assert a.available() == Need(12, 8)
    # empty extend
    assert a.alloc_extend(12, 12, 23).tolist() == []
    with pytest.raises(ValueError):
        a.alloc_extend(5, 4, 23)
    a.check_integrity()


def test_f05_alloc_extend_refuses_unmapped_partial_page() -> None:
    # Outside the frontier rule: the partial page lost its SWA. Positions 4, 5 of it have
    # no SWA KV, so mapping a fresh SWA page would pass uninitialised KV off as valid:
    # a typed invariant error, and nothing taken.
    a = make(4)
    r = a.alloc(6)  # pages 1, 2 -> SWA 1, 2
    a.free_swa(r[4:])
    assert mapping(a) == {1: 1}
    before = snapshot(a)
    with pytest.raises(KVInvariantError, match="partially filled full page 2"):
        a.alloc_extend(6, 9, int(r[-1]))
    assert snapshot(a) == before
    a.check_integrity()


# alloc_decode, page 4, after diverge() (full 1, 2 used; SWA 1 used):
# A: 3 tokens on full 3 (SWA 2), B: 4 tokens on full 4 (SWA 3), C: 5 tokens on full 5, 6
# (SWA 4, 5). Decode lens [3, 4, 5]: A continues page 3, B starts full page 7 (-> SWA 6),
# C continues page 6.
def test_alloc_decode_literal_page4() -> None:
    a = make(4)
    diverge(a)
    A = a.alloc(3)
    B = a.alloc(4)
    C = a.alloc(5)
    assert (A.tolist(), B.tolist(), C.tolist()) == (
        [12, 13, 14],
        [16, 17, 18, 19],
        [20, 21, 22, 23, 24],
    )
    out = a.alloc_decode(t([3, 4, 5]), t([14, 19, 24]))
    assert out.tolist() == [15, 28, 25]
    assert a.translate(out).tolist() == [11, 24, 21]
    assert mapping(a) == {2: 1, 3: 2, 4: 3, 5: 4, 6: 5, 7: 6}
    assert a.available() == Need(4, 0)
    a.check_integrity()


@pytest.mark.parametrize("P", PAGES)
def test_alloc_decode_across_page_boundaries(P: int) -> None:
    a = make(P)
    diverge(a)
    # A ends mid-page (or on a boundary when P == 1), B exactly fills one page.
    lenA = P + max(1, P // 2) if P > 1 else 1
    A = a.alloc(lenA)  # full pages 3 (,4) -> SWA 2 (,3)
    na = -(-lenA // P)
    B = a.alloc(P)  # full page 3 + na -> SWA 2 + na
    pb = 3 + na
    out = a.alloc_decode(t([lenA, P]), t([int(A[-1]), int(B[-1])]))
    if P == 1:
        # both decode tokens take fresh pages, in batch order
        assert out.tolist() == [pb + 1, pb + 2]
        assert a.translate(out).tolist() == [pb, pb + 1]
    else:
        # A continues its last page, B starts the next fresh full page
        assert out.tolist() == [int(A[-1]) + 1, (pb + 1) * P]
        assert a.translate(out).tolist() == [
            int(a.translate(A[-1:])[0]) + 1,
            (pb - 1 + 1) * P,
        ]
    a.check_integrity()
    assert a.is_swa_mapped(out).all()


@pytest.mark.parametrize("P", PAGES)
@pytest.mark.parametrize("W", [3, 4, 16, 40])
def test_alloc_extend_swa_tail_exact(P: int, W: int) -> None:
    a = make(P)
    a.alloc(P)  # full page 1 / SWA page 1 in use
    L = min(F - 1, 5) * P - (P // 2)  # 4.5 pages (P > 1) or 5 tokens: fits the full pool
    tail = swa_tail_len(L, W, P)
    start = swa_tail_start(L, W, P)
    n_full = -(-L // P)
    n_swa = n_full - start // P
    if n_swa > S - 1:
        with pytest.raises(OutOfKVMemory):
            a.alloc_extend_swa_tail(L, tail)
        return
    out = a.alloc_extend_swa_tail(L, tail)
    full_pages = list(range(2, 2 + n_full))
    assert out.tolist() == pslots(full_pages, P, L)
    swa_pages = list(range(2, 2 + n_swa))
    assert mapping(a) == {1: 1, **dict(zip(full_pages[n_full - n_swa :], swa_pages))}
    mapped = a.is_swa_mapped(out)
    assert mapped.tolist() == [i >= start for i in range(L)]
    tr = a.translate(out)
    assert (tr[:start] < P).all()  # unmapped -> padding page 0
    assert tr[start:].tolist() == pslots(swa_pages, P, L - start)
    assert a.available() == Need((F - 1 - n_full) * P, (S - 1 - n_swa) * P)
    a.check_integrity()


def test_alloc_extend_swa_tail_literal_and_errors() -> None:
    a = make(4)
    # L=11, W=2: tail starts at page_floor(9) = 8 -> only full page 3 maps to SWA 1
    out = a.alloc_extend_swa_tail(11, swa_tail_len(11, 2, 4))
    assert out.tolist() == [4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    assert mapping(a) == {3: 1}
    assert a.translate(out).tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6]
    before = snapshot(a)
    for L, tail in [(11, 2), (11, 12), (11, -1)]:
        with pytest.raises(ValueError):
            a.alloc_extend_swa_tail(L, tail)
        assert snapshot(a) == before
    # zero tail: full pages only
    z = a.alloc_extend_swa_tail(4, 0)
    assert z.tolist() == [16, 17, 18, 19] and mapping(a) == {3: 1}
    a.check_integrity()


# ----------------------------------------------------------------------------- freeing


@pytest.mark.parametrize("P", PAGES)
def test_free_returns_both_pools_to_the_back(P: int) -> None:
    a = make(P)
    diverge(a)
    r = a.alloc(2 * P)  # full 3, 4 -> SWA 2, 3
    a.free(r)
    assert a.full.pages.free_pages().tolist() == [5, 6, 7, 8, 3, 4]
    assert a.swa.free_pages().tolist() == [4, 5, 6, 2, 3]
    assert mapping(a) == {2: 1}
    a.check_integrity()
    # the next allocation takes the front of each list
    r2 = a.alloc(P)
    assert r2.tolist() == pslots([5], P)
    assert a.translate(r2).tolist() == pslots([4], P)
    # freeing one slot frees its whole page
    a.free(r2[:1])
    assert a.full.pages.free_pages().tolist()[-1] == 5
    assert a.available() == Need((F - 2) * P, (S - 1) * P)
    a.check_integrity()


@pytest.mark.parametrize("P", PAGES)
def test_free_of_free_page_raises_and_leaves_state(P: int) -> None:
    a = make(P)
    r = a.alloc(2 * P)
    x = a.alloc(P)
    a.free(r)
    before = snapshot(a)
    for bad in (r, r[:1], torch.cat((x, r)), t([0]), t([(F + 1) * P])):
        with pytest.raises(InvalidFree):
            a.free(bad)
        assert snapshot(a) == before
        a.check_integrity()
    # free_swa on a free full page is also an error
    with pytest.raises(InvalidFree):
        a.free_swa(r)
    assert snapshot(a) == before
    a.free(x)
    assert a.available() == a.total()


@pytest.mark.parametrize("P", PAGES)
@pytest.mark.parametrize("W", [3, 4, 16, 40])
def test_free_swa_follows_the_frontier(P: int, W: int) -> None:
    a = SWAAllocator(12, 12, P)
    L = 6 * P + (P // 2)
    r = a.alloc(L)
    assert mapping(a) == {k: k for k in range(1, 8 if P > 1 else 7)}
    f = max_frontier(L, W, P)
    a.free_swa(r[:f])
    dropped = f // P
    assert a.is_swa_mapped(r).tolist() == [i >= f for i in range(L)]
    assert mapping(a) == {k: k for k in range(dropped + 1, 8 if P > 1 else 7)}
    assert a.swa.free_pages().tolist() == list(range(8 if P > 1 else 7, 13)) + list(
        range(1, dropped + 1)
    )
    assert (a.translate(r[:f]) < P).all()
    assert a.translate(r[f:]).tolist() == r[f:].tolist()
    full_before = a.full.pages.free_pages().tolist()
    assert a.swa_available() == (12 - (-(-L // P)) + dropped) * P
    assert a.full_available() == (12 - (-(-L // P))) * P
    a.check_integrity()
    # freeing the SWA of already unmapped pages (and an empty range) is a no-op
    before = snapshot(a)
    a.free_swa(r[:f])
    a.free_swa(r[:0])
    assert snapshot(a) == before
    assert a.full.pages.free_pages().tolist() == full_before
    # freeing the request frees the full pages and only the still-mapped SWA pages
    a.free(r)
    assert a.available() == a.total()
    assert mapping(a) == {}
    a.check_integrity()


def test_free_swa_partial_range_is_whole_pages() -> None:
    a = make(4)
    r = a.alloc(12)  # pages 1, 2, 3
    a.free_swa(r[5:6])  # one slot of page 2: page 2's SWA goes
    assert mapping(a) == {1: 1, 3: 3}
    assert a.translate(r).tolist() == [4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15]
    assert a.is_swa_mapped(r).tolist() == [True] * 4 + [False] * 4 + [True] * 4
    a.check_integrity()


@pytest.mark.parametrize("P", PAGES)
def test_translate_vectorised(P: int) -> None:
    a = make(P)
    diverge(a)
    r = a.alloc(2 * P)  # full 3, 4 -> SWA 2, 3
    slots = torch.stack((r[0], r[-1], t([P])[0], t([0])[0], r[P - 1]))
    # full page 1 is unmapped (tail allocation), padding slot 0 -> page 0
    exp = [2 * P, 4 * P - 1, 0, 0, 3 * P - 1]
    assert a.translate(slots).tolist() == exp
    assert a.is_swa_mapped(slots).tolist() == [True, True, False, False, True]
    two_d = torch.stack((r[:2], r[:2])) if P > 1 else torch.stack((r, r))
    assert a.translate(two_d).shape == two_d.shape


@pytest.mark.parametrize("P", PAGES)
def test_batch_free_applies_once_at_exit(P: int) -> None:
    a = make(P)
    A = a.alloc(P)  # 1 -> 1
    B = a.alloc(2 * P)  # 2, 3 -> 2, 3
    C = a.alloc(P)  # 4 -> 4
    before = snapshot(a)
    with a.batch_free():
        a.free(A)
        a.free_swa(B[:P])
        with a.batch_free():  # nested: joins the outer batch
            a.free(C)
        assert snapshot(a) == before  # nothing applied yet
    # SWA-only frees first (page 2's SWA), then full frees (pages 1 and 4, sorted)
    assert a.full.pages.free_pages().tolist() == [5, 6, 7, 8, 1, 4]
    assert a.swa.free_pages().tolist() == [5, 6, 2, 1, 4]
    assert mapping(a) == {3: 3}
    assert a.is_swa_mapped(B).tolist() == [False] * P + [True] * P
    a.check_integrity()
    # free_swa and free of the same page in one batch
    with a.batch_free():
        a.free(B)
        a.free_swa(B)
    assert a.available() == a.total()
    a.check_integrity()


def test_batch_free_applies_on_exception() -> None:
    a = make(4)
    r = a.alloc(4)
    with pytest.raises(RuntimeError), a.batch_free():
        a.free(r)
        raise RuntimeError("boom")
    assert a.available() == a.total()
    assert a._pending_free is None  # a later batch starts fresh
    with a.batch_free():
        pass
    a.check_integrity()


def test_batch_free_invalid_raises_at_exit() -> None:
    a = make(4)
    r = a.alloc(4)
    a.free(r)
    before = snapshot(a)
    with pytest.raises(InvalidFree), a.batch_free():
        a.free(r)
    assert snapshot(a) == before
    a.check_integrity()


# ------------------------------------------------------------------- out of memory


def _oom_setups(P: int):
    """(name, allocator, op) where op runs one allocation that must not fit."""

    def full_short():
        # 8 full, 12 SWA pages; hold 7 full pages (SWA freed for 5 of them)
        a = SWAAllocator(8, 12, P)
        r = a.alloc(7 * P - (P > 1))
        a.free_swa(r[: 5 * P])
        return a, r

    def swa_short():
        # 12 full, 8 SWA pages; hold 7 pages of both
        a = SWAAllocator(12, 8, P)
        r = a.alloc(7 * P - (P > 1))
        return a, r

    return {"full_short": full_short, "swa_short": swa_short}


def _decode_batch(r: torch.Tensor, P: int) -> tuple[torch.Tensor, torch.Tensor]:
    """r continues (mid-page for P > 1); two page-aligned sequences start new pages."""
    n = int(r.numel())
    return t([n, P, 2 * P]), t([int(r[-1]), int(r[P - 1]), int(r[2 * P - 1])])


# op name -> (run the op on (allocator, held slots, P), Need in pages (full, swa))
OOM_OPS = {
    "extend_from_zero": (lambda a, r, P: a.alloc_extend(0, 2 * P, None), lambda P: (2, 2)),
    # P > 1: finish the partial last page, then 2 more pages; P == 1: 2 pages
    "extend_continue": (
        lambda a, r, P: a.alloc_extend(int(r.numel()), int(r.numel()) + 2 * P, int(r[-1])),
        lambda P: (2, 2),
    ),
    "decode": (
        lambda a, r, P: a.alloc_decode(*_decode_batch(r, P)),
        lambda P: (3, 3) if P == 1 else (2, 2),
    ),
    "swa_tail": (lambda a, r, P: a.alloc_extend_swa_tail(2 * P, 2 * P), lambda P: (2, 2)),
}


@pytest.mark.parametrize("P", PAGES)
@pytest.mark.parametrize("direction", ["full_short", "swa_short"])
@pytest.mark.parametrize("op", list(OOM_OPS))
def test_oom_is_atomic_across_pools(P: int, direction: str, op: str) -> None:
    a, r = _oom_setups(P)[direction]()
    a.check_integrity()
    # one free page left in the short pool, more in the other
    if direction == "full_short":
        assert a.available() == Need(1 * P, 10 * P)
    else:
        assert a.available() == Need(5 * P, 1 * P)
    fn, need_pages = OOM_OPS[op]
    nf, ns = need_pages(P)
    before = snapshot(a)
    with pytest.raises(OutOfKVMemory) as ei:
        fn(a, r, P)
    assert ei.value.need == Need(nf * P, ns * P)
    assert ei.value.available == a.available()
    assert not ei.value.need.fits(ei.value.available)
    assert snapshot(a) == before
    a.check_integrity()


@pytest.mark.parametrize("P", PAGES)
def test_swa_tail_oom_full_only_and_swa_only(P: int) -> None:
    # The tail needs fewer SWA pages than full pages: full short but SWA plenty.
    a = SWAAllocator(4, 8, P)
    a.alloc(P)
    before = snapshot(a)
    with pytest.raises(OutOfKVMemory) as ei:
        a.alloc_extend_swa_tail(4 * P, P)  # 4 full pages, 1 SWA page
    assert ei.value.need == Need(4 * P, 1 * P)
    assert snapshot(a) == before
    # SWA short: 2 SWA pages free, tail needs 3
    b = SWAAllocator(16, 3, P)
    b.alloc(P)
    before = snapshot(b)
    with pytest.raises(OutOfKVMemory) as ei:
        b.alloc_extend_swa_tail(5 * P, 3 * P)
    assert ei.value.need == Need(5 * P, 3 * P)
    assert snapshot(b) == before
    # exactly fitting works
    out = b.alloc_extend_swa_tail(5 * P, 2 * P)
    assert out.numel() == 5 * P and b.swa_available() == 0
    b.check_integrity()


@pytest.mark.parametrize("P", PAGES)
def test_page_zero_never_handed_out(P: int) -> None:
    a = make(P)
    slots = []
    while a.full_available() and a.swa_available():
        slots.append(a.alloc(P))
    allocated = torch.cat(slots)
    assert int(allocated.min()) >= P
    assert int(a.translate(allocated).min()) >= P
    a.check_integrity()
    with pytest.raises(OutOfKVMemory):
        a.alloc(1)
    a.free(allocated)
    assert a.available() == a.total()


def test_check_integrity_detects_corruption() -> None:
    a = make(4)
    r = a.alloc(8)
    a.full_to_swa_page[2] = 1  # two full pages share SWA page 1
    with pytest.raises(AssertionError):
        a.check_integrity()
    a.full_to_swa_page[2] = 2
    a.check_integrity()
    a.full_to_swa_page[5] = 3  # a free full page maps to SWA
    with pytest.raises(AssertionError):
        a.check_integrity()
    a.full_to_swa_page[5] = 0
    a.free(r)
    a.check_integrity()


# ------------------------------------------------------------------------ ReqTable


def test_req_table_rows_write_read_free() -> None:
    rt = ReqTable(3, 8)
    assert rt.num_free == 3
    assert [rt.alloc_row(), rt.alloc_row()] == [0, 1]
    rt.write(1, 0, t([4, 5, 6]))
    rt.write(1, 3, t([9]))
    assert rt.read(1, 0, 4).tolist() == [4, 5, 6, 9]
    assert rt.read(1, 2, 6).tolist() == [6, 9, 0, 0]
    assert rt.read(0, 0, 8).tolist() == [0] * 8
    with pytest.raises(ValueError):
        rt.write(1, 6, t([1, 2, 3]))
    rt.check_integrity()
    rt.free_row(1)
    assert rt.read(1, 0, 8).tolist() == [0] * 8
    assert rt.num_free == 2
    with pytest.raises(ValueError):
        rt.free_row(1)
    with pytest.raises(ValueError):
        rt.free_row(7)
    assert rt.alloc_row() == 1  # freed rows are reused first
    assert rt.alloc_row() == 2
    with pytest.raises(NoFreeRow):
        rt.alloc_row()
    rt.check_integrity()
    for r in (0, 1, 2):
        rt.free_row(r)
    assert rt.num_free == 3
    rt.check_integrity()


@pytest.mark.parametrize("P", [1, 4])
def test_move_swa_hands_pages_over(P: int) -> None:
    a = SWAAllocator(8, 8, P)
    dst = a.alloc(2 * P)  # full pages 1, 2 with SWA pages 1, 2
    a.free_swa(dst)  # dst becomes a tombstone
    src = a.alloc(2 * P)  # full pages 3, 4 with SWA pages 3, 4
    src_swa = a.translate(src).clone()
    a.move_swa(dst, src)
    assert torch.equal(a.translate(dst), src_swa)
    assert not bool(a.is_swa_mapped(src).any())
    a.check_integrity()
    with pytest.raises(ValueError):
        a.move_swa(dst, src)  # destination mapped, source unmapped now
    a.free(src)
    with pytest.raises(InvalidFree):
        a.move_swa(src, dst)  # src pages are free
    a.free(dst)
    a.check_integrity()
    assert a.available() == a.total()


# ------------------------------------------------------- finding 4: repeats in one free
def test_f04_page_repeated_within_one_free_is_refused() -> None:
    # Before: validate_give only rejected pages already free, so [a, b, a] went into the
    # ring twice and page a could later be handed to two owners.
    fl = PageFreeList(6)
    taken = fl.take(3)  # pages 1, 2, 3
    before = fl.free_pages().tolist()
    with pytest.raises(InvalidFree, match="twice"):
        fl.give(t([1, 2, 1]))
    assert fl.free_pages().tolist() == before
    fl.give(taken)
    fl.check_integrity()
    assert sorted(fl.free_pages().tolist()) == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("page", PAGES)
def test_f04_slots_repeated_within_one_free_are_refused(page: int) -> None:
    a = make(page)
    r = a.alloc(3 * page)
    before = snapshot(a)
    with pytest.raises(InvalidFree):
        a.free(torch.cat([r, r[:1]]))  # the first page named again after the others
    with pytest.raises(InvalidFree):
        a.free(torch.cat([r[:1], r]))  # the first slot twice in a row
    assert snapshot(a) == before
    a.free(r)
    assert a.available() == a.total()
    a.check_integrity()


@pytest.mark.parametrize("page", PAGES)
def test_f04_same_page_in_two_batched_frees_is_refused(page: int) -> None:
    # Before: batch_free concatenated the calls and the adjacent dedup merged the two
    # frees of the same page into one, hiding the caller's double free.
    a = make(page)
    r = a.alloc(2 * page)
    before = snapshot(a)
    with pytest.raises(InvalidFree), a.batch_free():
        a.free(r[page:])
        a.free(r[page:])
    assert snapshot(a) == before
    with pytest.raises(InvalidFree), a.batch_free():
        a.free_swa(r[:page])
        a.free_swa(r[:page])
    assert snapshot(a) == before
    with a.batch_free():  # SWA-only then full free of the same page is legitimate
        a.free_swa(r[:page])
        a.free(r)
    assert a.available() == a.total()
    a.check_integrity()
