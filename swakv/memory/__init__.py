from swakv.memory.allocator import InvalidFree, OutOfKVMemory, SWAAllocator
from swakv.memory.kv_pool import KVCopy, KVPool
from swakv.memory.pages import Need, max_frontier, swa_tail_len
from swakv.memory.req_table import ReqTable

__all__ = [
    "InvalidFree",
    "KVCopy",
    "KVPool",
    "Need",
    "OutOfKVMemory",
    "ReqTable",
    "SWAAllocator",
    "max_frontier",
    "swa_tail_len",
]
