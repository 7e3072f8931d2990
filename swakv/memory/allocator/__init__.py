from swakv.memory.allocator.base import InvalidFree, OutOfKVMemory, PageFreeList
from swakv.memory.allocator.paged import PagedAllocator
from swakv.memory.allocator.swa import SWAAllocator
from swakv.memory.allocator.token import TokenAllocator

__all__ = [
    "InvalidFree",
    "OutOfKVMemory",
    "PageFreeList",
    "PagedAllocator",
    "SWAAllocator",
    "TokenAllocator",
]
