"""Single-pool allocator for page size > 1 with partial-page continuation."""

from __future__ import annotations

import torch

from swakv.memory.allocator.base import INDEX_DTYPE, BaseAllocator, PageFreeList


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
        parts = []
        if head:
            if last_slot is None:
                raise ValueError("last_slot is required when prefix_len is not page aligned")
            parts.append(torch.arange(last_slot + 1, last_slot + 1 + head, dtype=INDEX_DTYPE))
        new_pages = self.pages.take(self.new_pages_for_extend(prefix_len, seq_len))
        if new_pages.numel():
            offsets = torch.arange(p, dtype=INDEX_DTYPE)
            body = (new_pages[:, None] * p + offsets[None, :]).reshape(-1)
            parts.append(body[: n - head])
        slots = torch.cat(parts) if len(parts) > 1 else (parts[0] if parts else new_pages)
        return slots, new_pages

    def decode_slots(
        self, cur_lens: torch.Tensor, last_slots: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        starts_page = cur_lens % self.page_size == 0
        new_pages = self.pages.take(int(starts_page.sum()))
        slots = last_slots + 1
        slots[starts_page] = new_pages * self.page_size
        return slots, new_pages
