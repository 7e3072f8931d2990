"""The hybrid allocator: a full pool, an SWA pool, and the page-level full->SWA map.

Invariants (checked by `check_integrity`):
- `full_to_swa_page[f]` is the SWA page of full page f, or 0 for none. Free full
  pages map to 0; no two full pages map to the same SWA page.
- Every allocated SWA page is mapped from exactly one allocated full page, so
  `swa free + mapped == swa total` and `full free + allocated == full total`.
- A token at full slot s has SWA slot `full_to_swa_page[s // P] * P + s % P` (page
  congruence by construction); an unmapped token translates into padding page 0.
- Every allocation is atomic across pools: both are checked before either is taken.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from swakv.memory.allocator.base import (
    BaseAllocator,
    InvalidFree,
    KVInvariantError,
    OutOfKVMemory,
    PageFreeList,
    as_numpy,
)
from swakv.memory.allocator.paged import PagedAllocator
from swakv.memory.allocator.token import TokenAllocator
from swakv.memory.pages import Need, num_pages


def make_single_pool(num_pages_: int, page_size: int) -> BaseAllocator:
    return TokenAllocator(num_pages_) if page_size == 1 else PagedAllocator(num_pages_, page_size)


class SWAAllocator:
    """Allocates full slots for request rows and maps their pages into the SWA pool.

    `num_full_pages` / `num_swa_pages` count usable pages (page 0 excluded); the
    pools' tensors need `(num_pages + 1) * page_size` slots.
    """

    def __init__(self, num_full_pages: int, num_swa_pages: int, page_size: int) -> None:
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.page_size = page_size
        self.full = make_single_pool(num_full_pages, page_size)
        self.swa = PageFreeList(num_swa_pages)
        self._map = np.zeros(num_full_pages + 1, dtype=np.int64)  # full page -> SWA page
        self._pending_free: list[torch.Tensor] | None = None
        self._pending_free_swa: list[torch.Tensor] | None = None

    @property
    def full_to_swa_page(self) -> torch.Tensor:
        """Int64 [num_full_pages + 1]: SWA page of each full page (0: none); a live view."""
        return torch.from_numpy(self._map)

    # ---- sizes (tokens) -------------------------------------------------------------
    @property
    def num_full_slots(self) -> int:
        """Slots in the full pool tensors, padding page included."""
        return (self.full.pages.num_pages + 1) * self.page_size

    @property
    def num_swa_slots(self) -> int:
        return (self.swa.num_pages + 1) * self.page_size

    def total(self) -> Need:
        return Need(self.full.pages.num_pages * self.page_size, self.swa.num_pages * self.page_size)

    def available(self) -> Need:
        return Need(self.full_available(), self.swa_available())

    def full_available(self) -> int:
        return self.full.pages.num_free * self.page_size

    def swa_available(self) -> int:
        return self.swa.num_free * self.page_size

    # ---- allocation -----------------------------------------------------------------
    def _check(self, full_pages: int, swa_pages: int) -> None:
        if full_pages > self.full.pages.num_free or swa_pages > self.swa.num_free:
            p = self.page_size
            raise OutOfKVMemory(Need(full_pages * p, swa_pages * p), self.available())

    def _map_new(self, full_pages: np.ndarray) -> None:
        self._map[full_pages] = self.swa.take(int(full_pages.size)).numpy()

    def alloc(self, num_tokens: int) -> torch.Tensor:
        """Full slots for `num_tokens` tokens on fresh pages, all mapped to SWA."""
        return self.alloc_extend(0, num_tokens, None)

    def alloc_extend(self, prefix_len: int, seq_len: int, last_slot: int | None) -> torch.Tensor:
        """Full slots for positions [prefix_len, seq_len) of one request.

        `last_slot` is the full slot of position prefix_len - 1; when prefix_len is not
        page aligned its page is continued in both pools. That page must hold live SWA
        (the frontier rule never frees the SWA of a partially filled page): if it does
        not, its earlier positions have no SWA KV and mapping a fresh page would let
        them read uninitialised KV as valid, so KVInvariantError is raised instead.
        """
        if seq_len < prefix_len:
            raise ValueError(f"seq_len {seq_len} < prefix_len {prefix_len}")
        if prefix_len % self.page_size and seq_len > prefix_len:
            page = int(last_slot) // self.page_size  # type: ignore[arg-type]
            if int(self._map[page]) == 0:
                raise KVInvariantError(
                    f"alloc_extend from {prefix_len}: the partially filled full page {page} "
                    "has no SWA page (its SWA was freed below the frontier rule)")
        n_new = self.full.new_pages_for_extend(prefix_len, seq_len)
        self._check(n_new, n_new)
        slots, new_pages = self.full.extend_slots(prefix_len, seq_len, last_slot)
        self._map_new(new_pages.numpy())
        return slots

    def alloc_decode(self, cur_lens: torch.Tensor, last_slots: torch.Tensor) -> torch.Tensor:
        """One full slot per request for the token at position `cur_lens[i]`.

        `last_slots[i]` is the full slot of position `cur_lens[i] - 1` (read only when
        cur_lens[i] is not page aligned). All or nothing across the batch.
        """
        lens = as_numpy(cur_lens)
        n_new = int((lens % self.page_size == 0).sum()) if self.page_size > 1 else lens.size
        self._check(n_new, n_new)
        slots, new_pages = self.full.decode_slots(cur_lens, last_slots)
        self._map_new(new_pages.numpy())
        return slots

    def alloc_extend_swa_tail(self, seq_len: int, tail_len: int, prefix_len: int = 0
                              ) -> torch.Tensor:
        """Full slots for [prefix_len, seq_len) on fresh pages; SWA pages only for the tail.

        The tail [seq_len - tail_len, seq_len) must start on a page boundary at or after
        `prefix_len` (it is `swa_tail_len` of the sequence, or the PD transfer's SWA
        span); earlier full pages map to 0. `prefix_len` (page aligned) positions are
        held elsewhere (PD decode: a prefix-cache hit) and get no slots here.
        Example, page 4: prefix 8, seq 21, tail 9 -> full pages for [8, 21) (4 pages),
        SWA pages for [12, 21) (3 pages); the full page of [8, 12) maps to 0.
        """
        p = self.page_size
        tail_start = seq_len - tail_len
        if tail_start % p or not 0 <= tail_len <= seq_len:
            raise ValueError(f"tail [{tail_start}, {seq_len}) is not a page-aligned suffix")
        if prefix_len % p or not 0 <= prefix_len <= tail_start:
            raise ValueError(f"prefix {prefix_len} is not page aligned or passes the tail "
                             f"start {tail_start}")
        n_full = num_pages(seq_len, p) - prefix_len // p
        n_swa = num_pages(seq_len, p) - tail_start // p
        self._check(n_full, n_swa)
        slots, new_pages = self.full.extend_slots(prefix_len, seq_len, None)
        self._map_new(new_pages.numpy()[n_full - n_swa :])
        return slots

    def alloc_pages(self, num_full_pages: int, num_tail_pages: int,
                    remap_full_pages: torch.Tensor | None = None) -> torch.Tensor:
        """Fresh full pages (returned, int64 page ids in hand-out order), of which the
        last `num_tail_pages` map to fresh SWA pages; and fresh SWA pages for the
        allocated, unmapped full pages `remap_full_pages`. All or nothing.

        A host-tier load-back uses it: full pages for the host-only span, SWA only for
        the window's pages, and SWA for device tombstones inside the window.
        """
        remap = (np.zeros(0, dtype=np.int64) if remap_full_pages is None
                 else as_numpy(remap_full_pages))
        if not 0 <= num_tail_pages <= num_full_pages:
            raise ValueError(f"tail of {num_tail_pages} pages out of {num_full_pages}")
        if remap.size:
            if self.full.pages._is_free[remap].any() or (self._map[remap] != 0).any():
                raise KVInvariantError("alloc_pages: remapped full pages must be allocated "
                                       "and have no SWA page")
            if np.unique(remap).size != remap.size:
                raise KVInvariantError("alloc_pages: a full page to remap is named twice")
        self._check(num_full_pages, num_tail_pages + int(remap.size))
        pages = self.full.pages.take(num_full_pages).numpy()
        self._map_new(np.concatenate((pages[num_full_pages - num_tail_pages :], remap)))
        return torch.from_numpy(pages)

    # ---- freeing --------------------------------------------------------------------
    def free(self, full_slots: torch.Tensor) -> None:
        """Free the full pages holding `full_slots` and their mapped SWA pages."""
        if self._pending_free is not None:
            self._pending_free.append(full_slots)
            return
        self._free_pages(self.full.pages_of(full_slots))

    def free_swa(self, full_slots: torch.Tensor) -> None:
        """Free only the SWA side of the pages holding `full_slots` (whole pages).

        Unmapped pages are skipped; the full pages stay allocated and map to 0.
        """
        if self._pending_free_swa is not None:
            self._pending_free_swa.append(full_slots)
            return
        self._free_swa_pages(self.full.pages_of(full_slots))

    def _free_pages(self, pages: np.ndarray) -> None:
        if pages.size == 0:
            return
        self.full.pages.validate_give(pages)
        swa_pages = self._map[pages]
        swa_pages = swa_pages[swa_pages > 0]
        self.swa.validate_give(swa_pages)
        self._map[pages] = 0
        self.full.pages._give_validated(pages)  # both validated above: nothing changed yet
        self.swa._give_validated(swa_pages)

    def _free_swa_pages(self, pages: np.ndarray) -> None:
        if pages.size == 0:
            return
        self.full.pages.validate_give(pages)  # the full pages must be allocated
        swa_pages = self._map[pages]
        mapped = swa_pages > 0
        self.swa.give(swa_pages[mapped])
        self._map[pages[mapped]] = 0

    @contextmanager
    def batch_free(self) -> Iterator[None]:
        """Collect every free/free_swa inside the block and apply them once at exit.

        SWA-only frees are applied first, then full frees. Nested use joins the outer batch.
        """
        if self._pending_free is not None:
            yield
            return
        self._pending_free, self._pending_free_swa = [], []
        try:
            yield
        finally:
            frees, swa_frees = self._pending_free, self._pending_free_swa
            self._pending_free = self._pending_free_swa = None
            if swa_frees:
                self._free_swa_pages(self._pages_of_calls(swa_frees))
            if frees:
                self._free_pages(self._pages_of_calls(frees))

    def _pages_of_calls(self, slot_lists: list[torch.Tensor]) -> np.ndarray:
        """Pages of several batched calls, call by call: a page two calls both name stays
        twice in the result, so the free rejects it as a double free."""
        if len(slot_lists) == 1:
            return self.full.pages_of(slot_lists[0])
        return np.concatenate([self.full.pages_of(x) for x in slot_lists])

    def move_swa(self, dst_full_slots: torch.Tensor, src_full_slots: torch.Tensor) -> None:
        """Hand the SWA pages of `src`'s full pages over to `dst`'s full pages.

        Both list the full slots of the same page-aligned positions (equal length, a
        multiple of the page size, each page's slots together), so page i of `src`
        holds the KV of the same tokens as page i of `dst` (tombstone revival). Every
        dst page must be allocated and unmapped, every src page mapped. Afterwards
        `translate(dst)` equals the old `translate(src)` and src pages map to 0; no
        free list changes.
        """
        p = self.page_size
        n = int(dst_full_slots.numel())
        if n != int(src_full_slots.numel()) or n % p:
            raise ValueError(f"move_swa: {n} and {src_full_slots.numel()} slots are not equal pages")
        dst_pages = as_numpy(dst_full_slots)[::p] // p
        src_pages = as_numpy(src_full_slots)[::p] // p
        swa_pages = self._map[src_pages]
        if self.full.pages._is_free[dst_pages].any():
            raise InvalidFree("move_swa to a full page that is not allocated")
        if (self._map[dst_pages] != 0).any() or (swa_pages == 0).any():
            raise ValueError("move_swa: destination already mapped or source unmapped")
        self._map[src_pages] = 0
        self._map[dst_pages] = swa_pages

    # ---- translation and inspection -------------------------------------------------
    def translate(self, full_slots: torch.Tensor) -> torch.Tensor:
        """SWA slots of `full_slots`; unmapped positions land in padding page 0."""
        p = self.page_size
        if p == 1:
            return self.full_to_swa_page[full_slots]
        return self.full_to_swa_page[full_slots // p] * p + full_slots % p

    def is_swa_mapped(self, full_slots: torch.Tensor) -> torch.Tensor:
        """Bool per slot: does its page hold live SWA KV?"""
        return self.full_to_swa_page[full_slots // self.page_size] > 0

    def check_integrity(self) -> None:
        self.full.pages.check_integrity()
        self.swa.check_integrity()
        full_free = self.full.pages.is_free_mask()
        mapping = self.full_to_swa_page  # torch view of self._map
        assert int(mapping[0]) == 0, "padding page 0 is mapped"
        assert not bool((mapping[full_free] != 0).any()), "a free full page maps to SWA"
        mapped = mapping[mapping > 0]
        assert mapped.numel() == int(torch.unique(mapped).numel()), "two full pages share an SWA page"
        assert not bool(self.swa.is_free_mask()[mapped].any()), "a mapped SWA page is free"
        assert self.swa.num_free + mapped.numel() == self.swa.num_pages, "SWA pages leaked"
