"""Single-pool allocator for page size > 1 with partial-page continuation."""

from __future__ import annotations

import numpy as np
import torch

from swakv.memory.allocator.base import BaseAllocator, PageFreeList, as_numpy


class PagedAllocator(BaseAllocator):
    """Hands out whole pages; a request fills its last page before taking another.

    Example, page 4: extend from prefix_len 6 (last_slot 13, page 3 holds positions
    4..7 at slots 12..15) to seq_len 11 gives slots 14, 15 (rest of page 3) then a
    new page p for positions 8..10: 4p, 4p+1, 4p+2.
    """

    def __init__(self, num_pages: int, page_size: int) -> None:
        if page_size < 2:
            raise ValueError("PagedAllocator needs page_size >= 2; use TokenAllocator")
        self.page_size = page_size
        self.pages = PageFreeList(num_pages)

    def extend_slots(
        self, prefix_len: int, seq_len: int, last_slot: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.page_size
        n = seq_len - prefix_len
        head = min((-prefix_len) % p, n)  # slots left in the partially filled last page
        if head and last_slot is None:
            raise ValueError("last_slot is required when prefix_len is not page aligned")
        new_pages = self.pages.take(self.new_pages_for_extend(prefix_len, seq_len))
        body = (new_pages.numpy()[:, None] * p + np.arange(p)).reshape(-1)[: n - head]
        if head:
            first = np.arange(int(last_slot) + 1, int(last_slot) + 1 + head, dtype=np.int64)
            body = np.concatenate((first, body))
        return torch.from_numpy(body), new_pages

    def decode_slots(
        self, cur_lens: torch.Tensor, last_slots: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        starts_page = as_numpy(cur_lens) % self.page_size == 0
        new_pages = self.pages.take(int(starts_page.sum()))
        slots = as_numpy(last_slots) + 1
        slots[starts_page] = new_pages.numpy() * self.page_size
        return torch.from_numpy(slots), new_pages
