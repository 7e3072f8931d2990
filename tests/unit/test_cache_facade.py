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


def extend(alloc: SWAAllocator, table: ReqTable, req: ReqKV, new_len: int) -> torch.Tensor:
    start = req.alloc_len
    last = int(table.read(req.row, start - 1, start)[0]) if start else None
    slots = alloc.alloc_extend(start, new_len, last)
    table.write(req.row, start, slots)
    req.kv_len = req.alloc_len = new_len
    return slots


def test_prefix_cache_lifecycle() -> None:
    alloc, table, cache = setup()
    total = alloc.total()
    a = ReqKV(table.alloc_row(), BASE[:22])
    m = cache.match(a.token_ids)
    assert (m.prefix_len, m.full_only_len) == (0, 0)
    cache.admit(a, m)
    slots_a = extend(alloc, table, a, 22)
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
    extend(alloc, table, a, 23)  # decode continues page 6
    cache.cache_finished(a)  # nothing new to insert; page 6 ([20, 23)) freed
    assert (a.kv_len, a.alloc_len, a.protected_len, a.lock) == (0, 0, 0, None)
    table.free_row(a.row)
    assert alloc.available() == total - Need(20, 8)
    assert cache.stats().evictable == cache.evictable() == Need(20, 8)
    cache.check_integrity([])

    b = ReqKV(table.alloc_row(), BASE[:22])
    m = cache.match(b.token_ids)  # end 20 needs [15, 20): live
    assert (m.prefix_len, m.full_only_len) == (20, 20)
    cache.admit(b, m)
    assert torch.equal(table.read(b.row, 0, 20), slots_a[:20])
    assert (b.kv_len, b.alloc_len, b.protected_len, b.frontier) == (20, 20, 20, 20)
    cache.check_integrity([b])

    c = ReqKV(table.alloc_row(), BASE[:16] + OTHER[:4])
    m = cache.match(c.token_ids)  # ends 16 and 12 need positions below 12: tombstoned
    assert (m.prefix_len, m.full_only_len) == (0, 16)
    cache.admit(c, m)
    slots_c = extend(alloc, table, c, 20)
    swa_c = alloc.translate(slots_c)
    before = alloc.available()
    cache.cache_finished(c)  # revives [0, 12) (locked by b), dedups [12, 16)
    table.free_row(c.row)
    # c's full pages for [0, 16) are duplicates, [16, 20) is new; SWA of [0, 12) adopted
    assert alloc.available() - before == Need(16, 4)
    assert torch.equal(alloc.translate(slots_a[:12]), swa_c[:12])  # the tree's own slots
    assert cache.match(BASE[:12]).prefix_len == 12
    assert cache.match(c.token_ids).prefix_len == 20
    s = cache.stats()
    assert (s.revived_tokens, s.hit_tokens, s.window_miss_tokens) == (12, 20, 16)
    cache.check_integrity([b])

    cache.release(b)
    table.free_row(b.row)
    cache.check_integrity([])
    assert cache.evict(Need(10**6, 10**6)).full == 24
    assert alloc.available() == total
    cache.check_integrity([])


def test_release_frees_request_owned_pages() -> None:
    alloc, table, cache = setup()
    total = alloc.total()
    r = ReqKV(table.alloc_row(), BASE[:30])
    cache.admit(r, cache.match(r.token_ids))
    extend(alloc, table, r, 13)
    cache.cache_unfinished(r)  # chunked prefill: [0, 12) to the tree
    extend(alloc, table, r, 30)
    cache.check_integrity([r])
    cache.release(r)  # retract: [12, 30) freed, nothing inserted
    table.free_row(r.row)
    assert alloc.available() == total - Need(12, 12)
    assert cache.match(BASE[:30]).prefix_len == 12
    cache.check_integrity([])


def test_chunk_cache() -> None:
    alloc, table, cache = setup(ChunkCache)
    total = alloc.total()
    r = ReqKV(table.alloc_row(), BASE[:22])
    m = cache.match(r.token_ids)
    assert (m.prefix_len, m.full_only_len, m.end) == (0, 0, None)
    cache.admit(r, m)
    extend(alloc, table, r, 22)
    cache.cache_unfinished(r)
    assert r.protected_len == 0 and r.lock is None
    assert cache.advance_frontier(r, 22) == 12
    cache.check_integrity([r])
    assert cache.evict(Need(100, 100)) == cache.evictable() == Need(0, 0)
    cache.cache_finished(r)
    table.free_row(r.row)
    assert alloc.available() == total
    assert cache.stats().cached == Need(0, 0)
    cache.check_integrity([])
