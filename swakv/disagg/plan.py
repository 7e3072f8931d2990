"""Which positions and pages of one request move from the prefill to the decode worker.

Both sides call `plan_transfer` with the same four numbers, so the decode side's
destination page lists and the prefill side's source page lists line up page for page.

For a prompt of L tokens, a decode-side prefix hit of `prefix_len` tokens (page
aligned: the decode worker already holds full KV for [0, prefix_len) and the SWA KV
that prefix's window needs), window W and page size P:

```
full span  [prefix_len, L)                                  every full layer
SWA span   [page_floor(max(prefix_len, L - W)), L)          every sliding layer
```

With prefix_len = 0 the SWA span starts at `swa_tail_start(L)` and holds
`swa_tail_len(L)` tokens (memory/pages.py), the tail `alloc_extend_swa_tail` maps.
Page indices below are indices into the request's page list (page i holds positions
[i*P, (i+1)*P)); the last page of a span may be partly filled.

Worked example, W = 512, P = 16, L = 1000, prefix 0: full [0, 1000) = pages 0..62
(63 pages, the last holding 8 tokens); SWA [480, 1000) = pages 30..62 (33 pages,
520 tokens). With prefix 496: full [496, 1000) = pages 31..62; SWA [496, 1000) too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from swakv.memory.pages import num_pages, page_floor


class PlanError(ValueError):
    """Inputs a transfer cannot be planned from (unaligned prefix, bad lengths, unmapped SWA)."""


@dataclass(frozen=True)
class PageSpan:
    """Positions [start, end) of one request in one pool; `start` is page aligned.

    An empty span (start == end) has no pages; `first_page` is then meaningless.
    """

    start: int
    end: int
    page_size: int

    def __post_init__(self) -> None:
        if not 0 <= self.start <= self.end:
            raise PlanError(f"span [{self.start}, {self.end}) is not a range")
        if self.start < self.end and self.start % self.page_size:
            raise PlanError(f"span start {self.start} is not page aligned (page {self.page_size})")

    @property
    def num_tokens(self) -> int:
        return self.end - self.start

    @property
    def first_page(self) -> int:
        """Index in the request's page list of the span's first page."""
        return self.start // self.page_size

    @property
    def num_pages(self) -> int:
        if self.start == self.end:
            return 0
        return num_pages(self.end, self.page_size) - self.first_page

    @property
    def end_page(self) -> int:
        """One past the index of the span's last page."""
        return self.first_page + self.num_pages

    @property
    def last_page_tokens(self) -> int:
        """Tokens in the span's last page (page_size unless `end` is unaligned); 0 if empty."""
        return self.num_tokens - (self.num_pages - 1) * self.page_size if self.num_pages else 0


@dataclass(frozen=True)
class TransferPlan:
    """What moves for one request: a full span and an SWA span (empty without sliding layers)."""

    prefix_len: int
    seq_len: int
    window: int | None
    page_size: int
    full: PageSpan
    swa: PageSpan


def swa_span_start(prefix_len: int, seq_len: int, window: int, page_size: int) -> int:
    """First position whose SWA KV moves: page_floor(max(prefix_len, L - W)).

    Equals `swa_tail_start(L)` whenever prefix_len <= swa_tail_start(L), and
    prefix_len (already aligned) otherwise.
    """
    return page_floor(max(prefix_len, seq_len - window), page_size)


def plan_transfer(prefix_len: int, seq_len: int, window: int | None, page_size: int) -> TransferPlan:
    """The shared transfer arithmetic; both workers call it with the same arguments."""
    if page_size < 1:
        raise PlanError(f"page_size must be >= 1, got {page_size}")
    if window is not None and window < 1:
        raise PlanError(f"window must be >= 1 or None, got {window}")
    if not 0 <= prefix_len <= seq_len:
        raise PlanError(f"prefix_len {prefix_len} not in [0, seq_len {seq_len}]")
    if prefix_len % page_size:
        raise PlanError(f"prefix_len {prefix_len} is not page aligned (page {page_size})")
    full = PageSpan(prefix_len, seq_len, page_size)
    if window is None:
        swa = PageSpan(seq_len, seq_len, page_size)
    else:
        swa = PageSpan(swa_span_start(prefix_len, seq_len, window, page_size), seq_len, page_size)
    return TransferPlan(prefix_len, seq_len, window, page_size, full, swa)


def host_int64(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """Int64 numpy copy-or-view of slot/page bookkeeping, wherever a tensor lives."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.int64)


def row_pages(full_slots: torch.Tensor | np.ndarray, span: PageSpan) -> np.ndarray:
    """Full pages holding the span's positions, from a request row's full slots.

    `full_slots[p]` is the full slot of position p, for p in [0, >= span.end); the
    result has span.num_pages entries (int64), page i holding positions of page
    index span.first_page + i.
    """
    slots = host_int64(full_slots)
    if slots.size < span.end:
        raise PlanError(f"row has {slots.size} slots, span ends at {span.end}")
    if not span.num_pages:
        return np.zeros(0, dtype=np.int64)
    p = span.page_size
    return slots[span.start : span.end : p] // p


def swa_row_pages(
    full_slots: torch.Tensor | np.ndarray, span: PageSpan, full_to_swa_page: torch.Tensor
) -> np.ndarray:
    """SWA pages holding the span's positions (through the allocator's page mapping).

    Raises PlanError if a page of the span has no SWA page: the sender must hold the
    whole SWA tail (the frontier rule keeps it: max_frontier <= swa_tail_start).
    """
    full_pages = row_pages(full_slots, span)
    swa_pages = host_int64(full_to_swa_page)[full_pages]
    unmapped = np.flatnonzero(swa_pages == 0)
    if unmapped.size:
        first = span.start + int(unmapped[0]) * span.page_size
        raise PlanError(f"SWA KV of position {first} is not mapped (span [{span.start}, {span.end}))")
    return swa_pages
