"""Page arithmetic, the two-dimensional `Need`, the SWA tail and the frontier rule.

All lengths here are token counts unless a name says pages. `page` is the page size.
"""

from __future__ import annotations

from dataclasses import dataclass


def page_floor(n: int, page: int) -> int:
    """Largest multiple of `page` that is <= n (n >= 0)."""
    return n - n % page


def page_ceil(n: int, page: int) -> int:
    """Smallest multiple of `page` that is >= n (n >= 0)."""
    return -(-n // page) * page


def num_pages(n: int, page: int) -> int:
    """Pages needed to hold n tokens."""
    return -(-n // page)


@dataclass(frozen=True, slots=True)
class Need:
    """A capacity in both pools, in tokens: `full` slots and `swa` slots.

    Never collapse the two with min() except for printing: a request can fit one
    pool and not the other.
    """

    full: int = 0
    swa: int = 0

    def __add__(self, other: Need) -> Need:
        return Need(self.full + other.full, self.swa + other.swa)

    def __sub__(self, other: Need) -> Need:
        return Need(self.full - other.full, self.swa - other.swa)

    def fits(self, capacity: Need) -> bool:
        """True if this need fits in `capacity` in both pools."""
        return self.full <= capacity.full and self.swa <= capacity.swa

    def clamp_min(self, lo: int = 0) -> Need:
        return Need(max(self.full, lo), max(self.swa, lo))

    def is_zero(self) -> bool:
        return self.full <= 0 and self.swa <= 0

    def __str__(self) -> str:
        return f"Need(full={self.full}, swa={self.swa})"


def swa_tail_start(seq_len: int, window: int, page: int) -> int:
    """First position whose SWA KV a sequence of `seq_len` must keep: page aligned.

    The next query (position seq_len) sees keys at positions > seq_len - window, so
    positions below page_floor(max(0, seq_len - window)) can go. Worked example,
    window 512, page 16: seq_len 1000 -> 1000 - 512 = 488 -> page_floor = 480.
    """
    return page_floor(max(0, seq_len - window), page)


def swa_tail_len(seq_len: int, window: int, page: int) -> int:
    """Tokens of the page-aligned SWA tail: `L - page_floor(max(0, L - W))`.

    Example: L=1000, W=512, page=16 -> 1000 - 480 = 520.
    """
    return seq_len - swa_tail_start(seq_len, window, page)


def max_frontier(seq_len: int, window: int, page: int) -> int:
    """Largest frontier allowed for a request of committed length `seq_len`.

    Positions below the frontier have their SWA freed. Both the next query and the
    page-aligned prefix the request will insert into the tree (length
    page_floor(seq_len)) must keep their window of W - 1 earlier positions:
    `frontier <= page_floor(page_floor(L) - (W - 1))`, never negative.
    It is also kept at or below `swa_tail_start(L)`, so a request whose frontier is at
    the maximum still holds the whole SWA tail a host copy or a PD transfer expects
    (at page 1, or when W % page == 1, the first bound alone would pass it by one page).
    Example: L=1000, W=512, page=16 -> page_floor(992 - 511) = page_floor(481) = 480,
    and swa_tail_start = 480.
    """
    rule = page_floor(page_floor(seq_len, page) - (window - 1), page)
    return max(0, min(rule, swa_tail_start(seq_len, window, page)))
