"""Table-driven tests for page arithmetic, the SWA tail, the frontier rule and Need."""

from __future__ import annotations

import pytest

from swakv.memory.pages import (
    Need,
    max_frontier,
    num_pages,
    page_ceil,
    page_floor,
    swa_tail_len,
    swa_tail_start,
)

# (n, page, page_floor, page_ceil, num_pages)
PAGE_CASES = [
    (0, 1, 0, 0, 0),
    (1, 1, 1, 1, 1),
    (7, 1, 7, 7, 7),
    (0, 4, 0, 0, 0),
    (1, 4, 0, 4, 1),
    (3, 4, 0, 4, 1),
    (4, 4, 4, 4, 1),
    (5, 4, 4, 8, 2),
    (8, 4, 8, 8, 2),
    (0, 16, 0, 0, 0),
    (15, 16, 0, 16, 1),
    (16, 16, 16, 16, 1),
    (17, 16, 16, 32, 2),
    (1000, 16, 992, 1008, 63),
]


@pytest.mark.parametrize("n,page,floor,ceil,pages", PAGE_CASES)
def test_page_arithmetic(n: int, page: int, floor: int, ceil: int, pages: int) -> None:
    assert page_floor(n, page) == floor
    assert page_ceil(n, page) == ceil
    assert num_pages(n, page) == pages
    assert pages * page == ceil


# (seq_len L, window W, page, swa_tail_start, swa_tail_len, max_frontier)
# tail_start = page_floor(max(0, L - W)); tail_len = L - tail_start;
# max_frontier = max(0, min(page_floor(page_floor(L) - (W - 1)), tail_start)).
WINDOW_CASES = [
    # page 1: every position is its own page
    (0, 3, 1, 0, 0, 0),
    (2, 3, 1, 0, 2, 0),
    (3, 3, 1, 0, 3, 0),
    (10, 3, 1, 7, 3, 7),
    (10, 1, 1, 9, 1, 9),
    (5, 5, 1, 0, 5, 0),
    (4, 40, 1, 0, 4, 0),
    (45, 40, 1, 5, 40, 5),
    # page 4, window smaller than a page (W=3)
    (0, 3, 4, 0, 0, 0),
    (3, 3, 4, 0, 3, 0),
    (4, 3, 4, 0, 4, 0),
    (6, 3, 4, 0, 6, 0),
    (7, 3, 4, 4, 3, 0),
    (8, 3, 4, 4, 4, 4),
    (11, 3, 4, 8, 3, 4),
    # page 4, window equal to a page (W=4)
    (4, 4, 4, 0, 4, 0),
    (8, 4, 4, 4, 4, 4),
    (9, 4, 4, 4, 5, 4),
    (12, 4, 4, 8, 4, 8),
    # page 4, window larger than a page (W=10)
    (9, 10, 4, 0, 9, 0),
    (10, 10, 4, 0, 10, 0),
    (14, 10, 4, 4, 10, 0),
    (20, 10, 4, 8, 12, 8),
    # page 16, window smaller / equal / larger
    (16, 8, 16, 0, 16, 0),
    (24, 8, 16, 16, 8, 0),
    (33, 8, 16, 16, 17, 16),
    (16, 16, 16, 0, 16, 0),
    (32, 16, 16, 16, 16, 16),
    (47, 16, 16, 16, 31, 16),
    (40, 40, 16, 0, 40, 0),
    (63, 40, 16, 16, 47, 0),
    (100, 40, 16, 48, 52, 48),
    # worked examples from the docstrings: W=512, page 16
    (1000, 512, 16, 480, 520, 480),
    (511, 512, 16, 0, 511, 0),
    (0, 512, 16, 0, 0, 0),
]


@pytest.mark.parametrize("L,W,page,start,tail,frontier", WINDOW_CASES)
def test_window_arithmetic(L: int, W: int, page: int, start: int, tail: int, frontier: int) -> None:
    assert swa_tail_start(L, W, page) == start
    assert swa_tail_len(L, W, page) == tail
    assert max_frontier(L, W, page) == frontier


@pytest.mark.parametrize("page", [1, 4, 16])
@pytest.mark.parametrize("W", [1, 3, 4, 5, 16, 17, 40, 512])
def test_window_properties_exhaustive(page: int, W: int) -> None:
    prev_frontier = 0
    for L in range(0, 3 * W + 4 * page + 3):
        start = swa_tail_start(L, W, page)
        tail = swa_tail_len(L, W, page)
        f = max_frontier(L, W, page)
        # never negative, page aligned, within the sequence
        assert 0 <= start <= L and start % page == 0
        assert 0 <= tail <= L and start + tail == L
        assert 0 <= f <= page_floor(L, page) and f % page == 0
        # the tail keeps every key the next query (position L) sees: j > L - W
        assert start <= max(0, L - W) < start + page
        assert tail >= min(L, W)
        # the frontier keeps the window of the next query and of the page-aligned prefix
        aligned = page_floor(L, page)
        # largest page boundary allowed by both bounds
        bound = min(aligned - (W - 1), start)
        if f > 0:
            assert f <= bound < f + page
        else:
            assert bound < page
        # the frontier only moves forward as the sequence grows
        assert f >= prev_frontier
        prev_frontier = f


def test_need_arithmetic() -> None:
    a, b = Need(10, 4), Need(3, 6)
    assert a + b == Need(13, 10)
    assert a - b == Need(7, -2)
    assert Need() == Need(0, 0)
    assert (a - b).clamp_min() == Need(7, 0)
    assert Need(-3, 2).clamp_min(1) == Need(1, 2)
    assert Need(0, 0).is_zero() and Need(-1, 0).is_zero()
    assert not Need(0, 1).is_zero() and not Need(1, -5).is_zero()
    assert str(Need(1, 2)) == "Need(full=1, swa=2)"
    with pytest.raises(AttributeError):
        a.full = 3  # type: ignore[misc]
    assert hash(Need(1, 2)) == hash(Need(1, 2))


# (need, capacity, fits)
FITS_CASES = [
    (Need(0, 0), Need(0, 0), True),
    (Need(4, 4), Need(4, 4), True),
    (Need(4, 4), Need(8, 3), False),  # SWA short
    (Need(9, 1), Need(8, 3), False),  # full short
    (Need(8, 3), Need(8, 3), True),
    (Need(1, 0), Need(0, 100), False),
    (Need(0, 1), Need(100, 0), False),
]


@pytest.mark.parametrize("need,cap,fits", FITS_CASES)
def test_need_fits(need: Need, cap: Need, fits: bool) -> None:
    assert need.fits(cap) is fits


@pytest.mark.parametrize("page,W", [(1, 3), (1, 512), (4, 5), (16, 17), (16, 1)])
def test_swa_tail_never_reaches_below_max_frontier(page: int, W: int) -> None:
    # a copy at the largest frontier always holds what a tail allocation maps
    for L in range(0, 2 * W + 3 * page):
        assert swa_tail_start(L, W, page) >= max_frontier(L, W, page), (L, W, page)
