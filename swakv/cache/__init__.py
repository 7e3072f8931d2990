"""What is cached and who may evict it: the window-aware radix prefix cache (DESIGN §4).

Modules: `node` (types), `lru` (lazy heaps), `tree` (RadixTree), `integrity`
(checks), `req_kv` (ReqKV), `base` (what the facades share, the lifecycle),
`facade` (PrefixCache), `hicache` (HiCache: with the host tier, `tree_host`),
`chunk_cache` (ChunkCache), `protocol` (KVCache, the interface the scheduler uses),
`tree_lock` and `tree_insert` (the lock and insert halves of the tree).
"""

from swakv.cache.base import CacheStats
from swakv.cache.chunk_cache import ChunkCache
from swakv.cache.facade import PrefixCache
from swakv.cache.hicache import HiCache
from swakv.cache.node import (
    InsertResult,
    LockError,
    LockHandle,
    MatchEnd,
    MatchResult,
    StaleMatch,
    TreeNode,
)
from swakv.cache.protocol import KVCache
from swakv.cache.req_kv import ReqKV
from swakv.cache.tree import RadixTree

__all__ = [
    "CacheStats",
    "ChunkCache",
    "HiCache",
    "InsertResult",
    "KVCache",
    "LockError",
    "LockHandle",
    "MatchEnd",
    "MatchResult",
    "PrefixCache",
    "RadixTree",
    "ReqKV",
    "StaleMatch",
    "TreeNode",
]
