"""PrefixCache / ChunkCache facade: a deterministic request lifecycle with exact rows,
lengths and pool deltas (page 4, window 6: cap 8, max_frontier(L) = floor4(floor4(L) - 5))."""

from __future__ import annotations

import torch

from swakv.cache import ChunkCache, PrefixCache, ReqKV
from swakv.memory import Need, ReqTable, SWAAllocator

P, W = 4, 6
BASE = list(range(100, 200))
OTHER = list(range(300, 400))


def setup(cls=PrefixCache):
    alloc = SWAAllocator(32, 32, P)
    table = ReqTable(4, 64)
    return alloc, table, cls(alloc, table, P, W)


def extend(cache, req: ReqKV, new_len: int) -> torch.Tensor:
    """Allocate and 'compute' positions [kv_len, new_len) through the facade."""
    start = req.kv_len
    assert cache.extend_need(req, new_len - start).fits(cache.available())
    cache.extend(req, new_len - start)
    cache.mark_computed(req, new_len)
    return cache.req_table.read(req.row, start, new_len)


def test_prefix_cache_lifecycle() -> None:
    alloc, table, cache = setup()
    total = alloc.total()
    m = cache.match(BASE[:22])
    assert (m.prefix_len, m.full_only_len) == (0, 0)
    a = cache.admit(BASE[:22], m)
    slots_a = extend(cache, a, 22)
    assert torch.equal(slots_a, torch.arange(4, 26))  # pages 1..6, the last one partial
    cache.check_integrity([a])

    assert cache.advance_frontier(a, 100) == 12  # clamped to max_frontier(22) = 12
    assert a.frontier == 12 and cache.advance_frontier(a, 8) == 0 and a.frontier == 12
    assert alloc.available() == total - Need(24, 12)
    cache.check_integrity([a])

    cache.cache_unfinished(a)  # tree: tombstone [0, 12), live [12, 20)
    assert a.protected_len == 20 and a.lock is not None
    s = cache.stats()
    assert s.cached == Need(20, 8) and s.protected == Need(20, 8) and s.num_nodes == 2
    cache.check_integrity([a])

    a.token_ids.append(7)
    extend(cache, a, 23)  # decode continues page 6
    cache.cache_finished(a)  # nothing new to insert; page 6 ([20, 23)) freed; row freed
    assert (a.row, a.kv_len, a.alloc_len, a.protected_len, a.lock) == (-1, 0, 0, 0, None)
    assert table.num_free == 4
    assert alloc.available() == total - Need(20, 8)
    assert cache.stats().evictable == cache.evictable() == Need(20, 8)
    cache.check_integrity([])

    m = cache.match(BASE[:22])  # end 20 needs [15, 20): live
    assert (m.prefix_len, m.full_only_len) == (20, 20)
    b = cache.admit(BASE[:22], m)
    assert torch.equal(table.read(b.row, 0, 20), slots_a[:20])
    assert (b.kv_len, b.alloc_len, b.protected_len, b.frontier) == (20, 20, 20, 20)
    cache.check_integrity([b])

    c_tokens = BASE[:16] + OTHER[:4]
    m = cache.match(c_tokens)  # ends 16 and 12 need positions below 12: tombstoned
    assert (m.prefix_len, m.full_only_len) == (0, 16)
    c = cache.admit(c_tokens, m)
    slots_c = extend(cache, c, 20)
    swa_c = alloc.translate(slots_c)
    before = alloc.available()
    cache.cache_finished(c)  # revives [0, 12) (locked by b), dedups [12, 16)
    # c's full pages for [0, 16) are duplicates, [16, 20) is new; SWA of [0, 12) adopted
    assert alloc.available() - before == Need(16, 4)
    assert torch.equal(alloc.translate(slots_a[:12]), swa_c[:12])  # the tree's own slots
    assert cache.match(BASE[:12]).prefix_len == 12
    assert cache.match(c_tokens).prefix_len == 20
    s = cache.stats()
    assert (s.revived_tokens, s.dedup_tokens) == (12, 16)
    cache.check_integrity([b])

    cache.release(b)
    cache.check_integrity([])
    assert cache.evict(Need(10**6, 10**6)).full == 24
    assert alloc.available() == total
    cache.check_integrity([])


def test_release_frees_request_owned_pages() -> None:
    alloc, table, cache = setup()
    total = alloc.total()
    r = cache.admit(BASE[:30], cache.match(BASE[:30]))
    extend(cache, r, 13)
    cache.cache_unfinished(r)  # chunked prefill: [0, 12) to the tree
    extend(cache, r, 30)
    cache.check_integrity([r])
    cache.release(r)  # abort: [12, 30) freed, nothing more inserted
    assert alloc.available() == total - Need(12, 12)
    assert cache.match(BASE[:30]).prefix_len == 12
    cache.check_integrity([])


def test_chunk_cache() -> None:
    alloc, table, cache = setup(ChunkCache)
    total = alloc.total()
    m = cache.match(BASE[:22])
    assert (m.prefix_len, m.full_only_len, m.end) == (0, 0, None)
    r = cache.admit(BASE[:22], m)
    extend(cache, r, 22)
    cache.cache_unfinished(r)
    assert r.protected_len == 0 and r.lock is None
    assert cache.advance_frontier(r, 22) == 12
    cache.check_integrity([r])
    assert cache.evict(Need(100, 100)) == cache.evictable() == Need(0, 0)
    cache.cache_finished(r)
    assert alloc.available() == total and table.num_free == 4
    assert cache.stats().cached == Need(0, 0)
    cache.check_integrity([])
