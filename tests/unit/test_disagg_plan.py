"""Table-driven tests for the PD transfer plan, and its agreement with memory/pages.py
and with the decode side's `alloc_extend_swa_tail`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from swakv.disagg.plan import (
    PageSpan,
    PlanError,
    plan_transfer,
    row_pages,
    swa_row_pages,
)
from swakv.memory.allocator import SWAAllocator
from swakv.memory.pages import swa_tail_len, swa_tail_start

# (prefix, L, W, P) -> full (start, end, first_page, num_pages, last_page_tokens),
#                      swa  (start, end, first_page, num_pages, last_page_tokens)
# SWA start = page_floor(max(prefix, L - W)); empty spans have 0 pages, 0 last tokens.
CASES = [
    # W < page (W=3, P=4): L=10 -> page_floor(7) = 4
    ((0, 10, 3, 4), (0, 10, 0, 3, 2), (4, 10, 1, 2, 2)),
    # ... L on a page boundary: L=8 -> page_floor(5) = 4, one whole page
    ((0, 8, 3, 4), (0, 8, 0, 2, 4), (4, 8, 1, 1, 4)),
    # W == page (W=4, P=4): L=10 -> 4; L=8 -> 4; L=9 -> page_floor(5) = 4, last page 1 token
    ((0, 10, 4, 4), (0, 10, 0, 3, 2), (4, 10, 1, 2, 2)),
    ((0, 8, 4, 4), (0, 8, 0, 2, 4), (4, 8, 1, 1, 4)),
    ((0, 9, 4, 4), (0, 9, 0, 3, 1), (4, 9, 1, 2, 1)),
    # W > page (W=512, P=16): L=1000 -> 488 -> 480, pages 30..62
    ((0, 1000, 512, 16), (0, 1000, 0, 63, 8), (480, 1000, 30, 33, 8)),
    # L on a page boundary: L=1008 -> 496, 32 whole pages
    ((0, 1008, 512, 16), (0, 1008, 0, 63, 16), (496, 1008, 31, 32, 16)),
    # L shorter than / equal to / one past the window: the tail is everything
    ((0, 300, 512, 16), (0, 300, 0, 19, 12), (0, 300, 0, 19, 12)),
    ((0, 512, 512, 16), (0, 512, 0, 32, 16), (0, 512, 0, 32, 16)),
    ((0, 513, 512, 16), (0, 513, 0, 33, 1), (0, 513, 0, 33, 1)),
    # W % P == 1 (W=513): L=1000 -> 487 -> 480; W = 1: 999 -> 992
    ((0, 1000, 513, 16), (0, 1000, 0, 63, 8), (480, 1000, 30, 33, 8)),
    ((0, 1000, 1, 16), (0, 1000, 0, 63, 8), (992, 1000, 62, 1, 8)),
    # decode-side prefix below the tail start: full moves from the prefix, SWA tail as before
    ((256, 1000, 512, 16), (256, 1000, 16, 47, 8), (480, 1000, 30, 33, 8)),
    # prefix equal to / beyond the tail start: SWA moves from the prefix too
    ((480, 1000, 512, 16), (480, 1000, 30, 33, 8), (480, 1000, 30, 33, 8)),
    ((496, 1000, 512, 16), (496, 1000, 31, 32, 8), (496, 1000, 31, 32, 8)),
    ((992, 1000, 512, 16), (992, 1000, 62, 1, 8), (992, 1000, 62, 1, 8)),
    # prefix == L (aligned): nothing moves
    ((1008, 1008, 512, 16), (1008, 1008, 63, 0, 0), (1008, 1008, 63, 0, 0)),
    # no sliding layers: the SWA span is empty
    ((0, 1000, None, 16), (0, 1000, 0, 63, 8), (1000, 1000, 62, 0, 0)),
    ((512, 1000, None, 16), (512, 1000, 32, 31, 8), (1000, 1000, 62, 0, 0)),
    # page 1: every position its own page; L=10, W=3 -> 7
    ((0, 10, 3, 1), (0, 10, 0, 10, 1), (7, 10, 7, 3, 1)),
    ((8, 10, 3, 1), (8, 10, 8, 2, 1), (8, 10, 8, 2, 1)),
]


def span_tuple(s: PageSpan) -> tuple[int, int, int, int, int]:
    return (s.start, s.end, s.first_page, s.num_pages, s.last_page_tokens)


@pytest.mark.parametrize("args,full,swa", CASES)
def test_plan_table(args, full, swa) -> None:
    prefix, seq_len, window, page = args
    plan = plan_transfer(prefix, seq_len, window, page)
    assert span_tuple(plan.full) == full
    assert span_tuple(plan.swa) == swa
    assert plan.full.end_page == plan.full.first_page + plan.full.num_pages
    assert (plan.prefix_len, plan.seq_len, plan.window, plan.page_size) == args


def test_plan_agrees_with_swa_tail_functions() -> None:
    """Without a prefix (or one at or below the tail start) the SWA span is exactly the
    tail of memory/pages.py; above it, the span starts at the prefix."""
    for page in (1, 2, 4, 16):
        for window in (1, 2, 3, 4, 5, 15, 16, 17, 33):
            for seq_len in range(0, 80):
                tail = swa_tail_start(seq_len, window, page)
                for prefix in range(0, seq_len + 1, page):
                    plan = plan_transfer(prefix, seq_len, window, page)
                    if prefix <= tail:
                        assert plan.swa.start == tail
                        assert plan.swa.num_tokens == swa_tail_len(seq_len, window, page)
                    else:
                        assert plan.swa.start == prefix
                    assert plan.full.start == prefix and plan.full.end == seq_len
                    # the span covers every key the next query (position L) can see
                    assert plan.swa.start <= max(prefix, seq_len - window + 1)


def test_plan_pages_are_the_pages_alloc_extend_swa_tail_maps() -> None:
    """The decode side preallocates with alloc_extend_swa_tail: the pages the plan's SWA
    span names are exactly the row's pages that got an SWA page."""
    for page, window, seq_len in [(4, 3, 10), (4, 4, 9), (16, 512, 1000), (16, 512, 1008),
                                  (16, 512, 300), (1, 3, 10), (16, 513, 1000)]:
        a = SWAAllocator(80, 80, page)
        plan = plan_transfer(0, seq_len, window, page)
        row = a.alloc_extend_swa_tail(seq_len, swa_tail_len(seq_len, window, page))
        full_pages = row_pages(row, plan.full)
        mapped = a.full_to_swa_page[torch.as_tensor(full_pages)] > 0
        expected = np.zeros(plan.full.num_pages, dtype=bool)
        expected[plan.swa.first_page : plan.swa.end_page] = True
        assert mapped.numpy().tolist() == expected.tolist()


def test_row_pages_and_swa_row_pages_exact() -> None:
    # page 4, W 3: a fresh allocator hands out full pages 1, 2, 3 and SWA pages 1, 2 for
    # the tail (positions [4, 10) = row pages 2, 3)
    a = SWAAllocator(10, 10, 4)
    plan = plan_transfer(0, 10, 3, 4)
    row = a.alloc_extend_swa_tail(10, swa_tail_len(10, 3, 4))
    assert row.tolist() == [4, 5, 6, 7, 8, 9, 10, 11, 12, 13]
    assert row_pages(row, plan.full).tolist() == [1, 2, 3]
    assert row_pages(row, plan.swa).tolist() == [2, 3]
    assert swa_row_pages(row, plan.swa, a.full_to_swa_page).tolist() == [1, 2]
    # with a prefix of one page the full span is row pages 2, 3
    assert row_pages(row, plan_transfer(4, 10, 3, 4).full).tolist() == [2, 3]
    # empty span
    assert row_pages(row, plan_transfer(0, 10, None, 4).swa).tolist() == []


def test_swa_row_pages_refuses_unmapped_positions() -> None:
    a = SWAAllocator(10, 10, 4)
    row = a.alloc(10)
    a.free_swa(row[:8])  # positions [0, 8) lose their SWA pages
    plan = plan_transfer(0, 10, 3, 4)  # needs SWA for [4, 10)
    with pytest.raises(PlanError, match="position 4 is not mapped"):
        swa_row_pages(row, plan.swa, a.full_to_swa_page)
    with pytest.raises(PlanError, match="row has 6 slots"):
        row_pages(row[:6], plan.full)


@pytest.mark.parametrize("args,match", [
    ((3, 10, 3, 4), "not page aligned"),
    ((12, 10, 3, 4), r"not in \[0, seq_len 10\]"),
    ((-4, 10, 3, 4), r"not in \[0"),
    ((0, 10, 3, 0), "page_size must be >= 1"),
    ((0, 10, 0, 4), "window must be >= 1"),
])
def test_plan_rejects_bad_inputs(args, match) -> None:
    with pytest.raises(PlanError, match=match):
        plan_transfer(*args)


def test_page_span_validation() -> None:
    with pytest.raises(PlanError, match="not page aligned"):
        PageSpan(3, 10, 4)
    with pytest.raises(PlanError, match="not a range"):
        PageSpan(8, 4, 4)
    assert PageSpan(3, 3, 4).num_pages == 0  # empty spans need no alignment
