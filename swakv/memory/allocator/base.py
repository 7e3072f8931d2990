"""The allocator contract, its typed errors, and the page free list both pools use.

Slots and pages: a pool of `num_pages` usable pages has slots
`[0, (num_pages + 1) * page_size)`; page 0 (slots `[0, page_size)`) is padding and
never handed out, so slot 0 can stand for "no KV" in gathers. Slot s lives in page
`s // page_size` at offset `s % page_size`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

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
    """Freeing a page that is not allocated (already free, page 0, or out of range)."""


class PageFreeList:
    """Owns the free page ids `1..num_pages` of one pool.

    Pages are taken from the front and returned to the back, so a fresh list hands
    out 1, 2, 3, ... in order (tests rely on that for exact slots).
    """

    def __init__(self, num_pages: int) -> None:
        if num_pages < 0:
            raise ValueError(f"num_pages must be >= 0, got {num_pages}")
        self.num_pages = num_pages
        self._free = torch.arange(1, num_pages + 1, dtype=INDEX_DTYPE)
        self._is_free = torch.ones(num_pages + 1, dtype=torch.bool)
        self._is_free[0] = False

    @property
    def num_free(self) -> int:
        return int(self._free.numel())

    def take(self, n: int) -> torch.Tensor:
        """The first n free pages; the caller has checked `n <= num_free`."""
        if n > self.num_free:
            raise AssertionError(f"take({n}) with only {self.num_free} free pages")
        pages, self._free = self._free[:n], self._free[n:]
        self._is_free[pages] = False
        return pages

    def validate_give(self, pages: torch.Tensor) -> None:
        """Raise InvalidFree unless every page in `pages` is allocated."""
        if pages.numel() == 0:
            return
        lo, hi = (int(x) for x in torch.aminmax(pages))
        if lo < 1 or hi > self.num_pages:
            raise InvalidFree(f"page id out of range [1, {self.num_pages}]: {lo}..{hi}")
        if bool(self._is_free[pages].any()):
            bad = pages[self._is_free[pages]].tolist()[:8]
            raise InvalidFree(f"pages already free: {bad}")

    def give(self, pages: torch.Tensor) -> None:
        """Return distinct allocated pages to the free list (validated first)."""
        self.validate_give(pages)
        self._give_validated(pages)

    def _give_validated(self, pages: torch.Tensor) -> None:
        """`give` without the check, for callers that just ran `validate_give(pages)`."""
        self._is_free[pages] = True
        self._free = torch.cat((self._free, pages))

    def free_pages(self) -> torch.Tensor:
        return self._free

    def is_free_mask(self) -> torch.Tensor:
        """Bool [num_pages + 1]: True for free pages (page 0 is never free)."""
        return self._is_free

    def check_integrity(self) -> None:
        free = self._free
        assert free.numel() == int(torch.unique(free).numel()), "duplicate free pages"
        if free.numel():
            assert int(free.min()) >= 1 and int(free.max()) <= self.num_pages, "bad page id"
        assert not bool(self._is_free[0]), "page 0 marked free"
        assert int(self._is_free.sum()) == free.numel(), "free mask disagrees with free list"
        assert bool(self._is_free[free].all()), "free list page not marked free"


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

    def pages_of(self, slots: torch.Tensor) -> torch.Tensor:
        """Distinct pages holding `slots`, which list each page's slots together.

        Every caller frees runs of positions (a request's row range, a tree node's
        value, or several such runs concatenated), so repeats are adjacent and a
        sort-free `unique_consecutive` suffices. A page repeated non-adjacently is a
        double free by the caller; `check_integrity` reports it as a duplicate.
        """
        return torch.unique_consecutive(slots // self.page_size)
