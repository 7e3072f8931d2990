"""The allocator contract, its typed errors, and the page free list both pools use.

Slots and pages: a pool of `num_pages` usable pages has slots
`[0, (num_pages + 1) * page_size)`; page 0 (slots `[0, page_size)`) is padding and
never handed out, so slot 0 can stand for "no KV" in gathers. Slot s lives in page
`s // page_size` at offset `s % page_size`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch

from swakv.memory.pages import Need

INDEX_DTYPE = torch.int64


class OutOfKVMemory(Exception):
    """An allocation did not fit; nothing was taken from either pool.

    `need` is what the operation asked for and `available` what the pools had, both
    in tokens (whole pages).
    """

    def __init__(self, need: Need, available: Need) -> None:
        super().__init__(f"out of KV memory: need {need}, available {available}")
        self.need = need
        self.available = available


class InvalidFree(Exception):
    """Freeing a page that is not allocated (already free, page 0, or out of range), or
    naming a page (or slot) twice in one free (within a call or across a batch)."""


class KVInvariantError(Exception):
    """An internal invariant of the KV bookkeeping is broken: a bug in the caller, not a
    capacity problem. Nothing was changed when it is raised."""


def as_numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """Zero-copy int64 numpy view of a CPU index tensor (bookkeeping runs in numpy:
    per-call overhead is ~1 µs against ~5 µs for a torch op on small tensors)."""
    return x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.int64)


class PageFreeList:
    """Owns the free page ids `1..num_pages` of one pool.

    A FIFO ring: pages are taken from the front and returned to the back, so a fresh
    list hands out 1, 2, 3, ... in order (tests rely on that for exact slots).
    Ring positions `[head, head + count)` (mod num_pages) hold the free pages.
    """

    def __init__(self, num_pages: int) -> None:
        if num_pages < 0:
            raise ValueError(f"num_pages must be >= 0, got {num_pages}")
        self.num_pages = num_pages
        self._ring = np.arange(1, num_pages + 1, dtype=np.int64)
        self._head = 0
        self._count = num_pages
        self._is_free = np.ones(num_pages + 1, dtype=np.bool_)
        self._is_free[0] = False
        # Scratch for the repeat check of `validate_give`: mark[page] = its last index in
        # the call. Contents between calls are meaningless.
        self._mark = np.zeros(num_pages + 1, dtype=np.int64)

    @property
    def num_free(self) -> int:
        return self._count

    def _ring_span(self, start: int, n: int) -> tuple[slice, slice]:
        """Ring index ranges of n entries from `start` (the second is empty unless wrapping)."""
        cap = self.num_pages
        start %= cap if cap else 1
        first = min(n, cap - start)
        return slice(start, start + first), slice(0, n - first)

    def take(self, n: int) -> torch.Tensor:
        """The first n free pages; the caller has checked `n <= num_free`."""
        if n > self._count:
            raise AssertionError(f"take({n}) with only {self._count} free pages")
        a, b = self._ring_span(self._head, n)
        pages = self._ring[a] if b.stop == 0 else np.concatenate((self._ring[a], self._ring[b]))
        pages = pages.copy()
        self._head = (self._head + n) % (self.num_pages or 1)
        self._count -= n
        self._is_free[pages] = False
        return torch.from_numpy(pages)

    def validate_give(self, pages: torch.Tensor | np.ndarray) -> None:
        """Raise InvalidFree unless the pages are distinct and every one is allocated.

        The repeat check is O(len(pages)) without sorting: each page records the index
        of its last occurrence, so an earlier occurrence of a repeated page disagrees.
        """
        pages = as_numpy(pages)
        if pages.size == 0:
            return
        lo, hi = int(pages.min()), int(pages.max())
        if lo < 1 or hi > self.num_pages:
            raise InvalidFree(f"page id out of range [1, {self.num_pages}]: {lo}..{hi}")
        already = self._is_free[pages]
        if already.any():
            raise InvalidFree(f"pages already free: {pages[already][:8].tolist()}")
        if pages.size > 1:
            order = np.arange(pages.size, dtype=np.int64)
            self._mark[pages] = order
            repeated = self._mark[pages] != order
            if repeated.any():
                raise InvalidFree(f"pages named twice in one free: {pages[repeated][:8].tolist()}")

    def give(self, pages: torch.Tensor | np.ndarray) -> None:
        """Return distinct allocated pages to the free list (validated first)."""
        self.validate_give(pages)
        self._give_validated(as_numpy(pages))

    def _give_validated(self, pages: np.ndarray) -> None:
        """`give` without the check, for callers that just ran `validate_give(pages)`."""
        n = pages.size
        if n == 0:
            return
        a, b = self._ring_span(self._head + self._count, n)
        self._ring[a] = pages[: a.stop - a.start]
        self._ring[b] = pages[a.stop - a.start :]
        self._count += n
        self._is_free[pages] = True

    def free_pages(self) -> torch.Tensor:
        """The free pages in hand-out order (a copy)."""
        a, b = self._ring_span(self._head, self._count)
        return torch.from_numpy(np.concatenate((self._ring[a], self._ring[b])))

    def is_free_mask(self) -> torch.Tensor:
        """Bool [num_pages + 1]: True for free pages (page 0 is never free); a live view."""
        return torch.from_numpy(self._is_free)

    def check_integrity(self) -> None:
        free = self.free_pages().numpy()
        assert free.size == np.unique(free).size, "duplicate free pages"
        if free.size:
            assert int(free.min()) >= 1 and int(free.max()) <= self.num_pages, "bad page id"
        assert not self._is_free[0], "page 0 marked free"
        assert int(self._is_free.sum()) == free.size, "free mask disagrees with free list"
        assert self._is_free[free].all(), "free list page not marked free"


class BaseAllocator(ABC):
    """Contract of a single-pool slot allocator (whole pages, page 0 reserved)."""

    page_size: int
    pages: PageFreeList

    @abstractmethod
    def extend_slots(
        self, prefix_len: int, seq_len: int, last_slot: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Take pages for positions [prefix_len, seq_len) and return (slots, new_pages).

        Continues the partially filled page that holds `last_slot` (the slot of
        position prefix_len - 1) when prefix_len is not page aligned. The caller has
        checked capacity with `new_pages_for_extend`.
        """

    @abstractmethod
    def decode_slots(
        self, cur_lens: torch.Tensor, last_slots: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One new slot per request at position cur_lens[i]; returns (slots, new_pages)."""

    def new_pages_for_extend(self, prefix_len: int, seq_len: int) -> int:
        p = self.page_size
        return -(-seq_len // p) - (-(-prefix_len // p))

    def available_tokens(self) -> int:
        return self.pages.num_free * self.page_size

    def pages_of(self, slots: torch.Tensor) -> np.ndarray:
        """Pages holding `slots`, one entry per run of slots in the same page.

        Every caller frees runs of positions (a request's row range, a tree node's
        value), so a page's slots are adjacent and strictly increasing (a page fills in
        position order); a sort-free adjacent dedup gives its pages. A slot named twice
        inside a run raises InvalidFree here; a page named again later (a second run)
        stays in the result and `PageFreeList.validate_give` rejects the repeat.
        """
        slots = as_numpy(slots)
        pages = slots // self.page_size
        if pages.size > 1:
            same_page = pages[1:] == pages[:-1]
            if (same_page & (slots[1:] <= slots[:-1])).any():
                raise InvalidFree("a slot is named twice (or out of order) within one page")
            pages = pages[np.concatenate(([True], ~same_page))]
        return pages
