"""`PoolSizes`: the page counts and bytes of a pair of KV pools (full, SWA).

One type for the device pools (`sched.sizing.size_pools`) and the host pools
(`HostPoolSizes`, `memory.host_pool.host_pool_sizes`): page counts exclude the padding
page 0, so page ids run `1..num_*_pages`; bytes are the K+V bytes of all the pool's
layer tensors, padding page included (0 where a caller does not size by bytes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class PoolSizes:
    num_full_pages: int  # usable pages (page 0 excluded), >= 0
    num_swa_pages: int  # >= 0
    page_size: int  # tokens per page, >= 1
    full_bytes: int
    swa_bytes: int

    _kind: ClassVar[str] = "pool"  # names the pools in errors

    def __post_init__(self) -> None:
        if self.page_size < 1 or self.num_full_pages < 0 or self.num_swa_pages < 0:
            raise ValueError(f"bad {self._kind} sizes: {self}")

    @property
    def full_tokens(self) -> int:
        return self.num_full_pages * self.page_size

    @property
    def swa_tokens(self) -> int:
        return self.num_swa_pages * self.page_size
