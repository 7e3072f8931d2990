"""Single-pool allocator for page size 1: a slot is its page id."""

from __future__ import annotations

import torch

from swakv.memory.allocator.base import BaseAllocator, PageFreeList


class TokenAllocator(BaseAllocator):
    """Page size 1: every token takes a fresh page, so no partial-page logic exists."""

    def __init__(self, num_slots: int) -> None:
        self.page_size = 1
        self.pages = PageFreeList(num_slots)

    def extend_slots(
        self, prefix_len: int, seq_len: int, last_slot: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        pages = self.pages.take(seq_len - prefix_len)
        return pages, pages

    def decode_slots(
        self, cur_lens: torch.Tensor, last_slots: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        pages = self.pages.take(int(cur_lens.numel()))
        return pages, pages
