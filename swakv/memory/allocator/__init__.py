from swakv.memory.allocator.base import (
    InvalidFree,
    KVInvariantError,
    OutOfKVMemory,
    PageFreeList,
)
from swakv.memory.allocator.paged import PagedAllocator
from swakv.memory.allocator.swa import SWAAllocator
from swakv.memory.allocator.token import TokenAllocator

__all__ = [
    "InvalidFree",
    "KVInvariantError",
    "OutOfKVMemory",
    "PageFreeList",
    "PagedAllocator",
    "SWAAllocator",
    "TokenAllocator",
]
