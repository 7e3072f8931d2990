"""PD decode-side allocation: `SWAAllocator.alloc_extend_swa_tail` with a prefix and the
facade's `extend_remote` (exact slots, mappings, frontier, atomic failure)."""

from __future__ import annotations

import pytest

from swakv.cache import ChunkCache, PrefixCache
from swakv.disagg.plan import plan_transfer, row_pages, swa_row_pages
from swakv.memory import Need, ReqTable, SWAAllocator
from swakv.memory.allocator.base import KVInvariantError, OutOfKVMemory

P, W = 4, 8
TOKENS = list(range(100, 200))


def setup(cls=PrefixCache, full=32, swa=32):
    alloc = SWAAllocator(full, swa, P)
    return alloc, cls(alloc, ReqTable(4, 64), P, W)


def test_tail_with_a_prefix_takes_full_pages_after_it_and_swa_for_the_tail():
    a = SWAAllocator(16, 16, P)
    slots = a.alloc_extend_swa_tail(21, 9, prefix_len=8)  # [8, 21): 4 pages, SWA [12, 21)
    assert slots.tolist() == list(range(4, 17))  # pages 1..4, the last holding one token
    assert a.full_to_swa_page[1:6].tolist() == [0, 1, 2, 3, 0]
    assert a.available() == Need((16 - 4) * P, (16 - 3) * P)
    a.check_integrity()


@pytest.mark.parametrize("seq,tail,prefix", [(21, 9, 6), (21, 9, 16), (21, 10, 0), (8, 9, 0)])
def test_tail_refuses_unaligned_or_crossing_spans(seq, tail, prefix):
    a = SWAAllocator(16, 16, P)
    with pytest.raises(ValueError):
        a.alloc_extend_swa_tail(seq, tail, prefix_len=prefix)
    assert a.available() == a.total()


def test_tail_default_prefix_keeps_the_old_behaviour():
    a = SWAAllocator(16, 16, P)
    slots = a.alloc_extend_swa_tail(10, 6)  # full [0, 10) = 3 pages, SWA [4, 10) = 2 pages
    assert slots.tolist() == list(range(4, 14))
    assert a.full_to_swa_page[1:4].tolist() == [0, 1, 2]


@pytest.mark.parametrize("cls", [PrefixCache, ChunkCache])
def test_extend_remote_without_a_hit(cls):
    alloc, cache = setup(cls)
    kv = cache.admit(TOKENS[:30], cache.match(TOKENS[:30]))
    assert cache.remote_need(kv, 30) == Need(32, 12)  # SWA [20, 30): page_floor(22) = 20
    cache.extend_remote(kv, 30)
    assert (kv.kv_len, kv.alloc_len, kv.frontier, kv.protected_len) == (0, 30, 20, 0)
    row = cache.req_table.read(kv.row, 0, 30)
    plan = plan_transfer(0, 30, W, P)
    assert row_pages(row, plan.full).tolist() == list(range(1, 9))
    assert swa_row_pages(row, plan.swa, alloc.full_to_swa_page).tolist() == [1, 2, 3]
    cache.mark_computed(kv, 30)
    cache.check_integrity([kv])
    cache.release(kv)
    assert alloc.available() == alloc.total()


def test_extend_remote_after_a_prefix_hit_allocates_only_the_delta():
    alloc, cache = setup()
    first = cache.admit(TOKENS[:24], cache.match(TOKENS[:24]))
    cache.extend(first, 24)
    cache.mark_computed(first, 24)
    cache.cache_finished(first)  # the tree holds [0, 24) with its SWA
    before = alloc.available()
    m = cache.match(TOKENS[:40])
    assert m.prefix_len == 24
    kv = cache.admit(TOKENS[:40], m)
    assert cache.remote_need(kv, 40) == Need(16, 8)  # full [24, 40); SWA [32, 40)
    cache.extend_remote(kv, 40)
    assert (kv.kv_len, kv.alloc_len, kv.frontier, kv.protected_len) == (24, 40, 32, 24)
    assert alloc.available() == before - Need(16, 8)
    plan = plan_transfer(24, 40, W, P)
    assert (plan.full.start, plan.swa.start) == (24, 32)
    cache.mark_computed(kv, 40)
    cache.check_integrity([kv])
    cache.cache_finished(kv)
    cache.check_integrity([])


def test_extend_remote_with_the_whole_prompt_cached_takes_nothing():
    alloc, cache = setup()
    first = cache.admit(TOKENS[:16], cache.match(TOKENS[:16]))
    cache.extend(first, 16)
    cache.mark_computed(first, 16)
    cache.cache_finished(first)
    kv = cache.admit(TOKENS[:16], cache.match(TOKENS[:16]))
    before = alloc.available()
    assert cache.remote_need(kv, 16) == Need(0, 0)
    cache.extend_remote(kv, 16)
    assert alloc.available() == before and kv.frontier == 16
    cache.mark_computed(kv, 16)
    cache.check_integrity([kv])
    cache.release(kv)


def test_extend_remote_with_an_explicit_swa_start_and_bad_ones():
    alloc, cache = setup()
    kv = cache.admit(TOKENS[:30], cache.match(TOKENS[:30]))
    for bad in (6, 32, -4):
        with pytest.raises(KVInvariantError):
            cache.extend_remote(kv, 30, swa_start=bad)
    assert alloc.available() == alloc.total() and kv.alloc_len == 0
    cache.extend_remote(kv, 30, swa_start=0)  # SWA for every position (the naive layout)
    assert kv.frontier == 0 and alloc.available() == alloc.total() - Need(32, 32)
    with pytest.raises(KVInvariantError):  # not settled: kv_len < alloc_len
        cache.extend_remote(kv, 34)
    cache.release(kv)


def test_extend_remote_is_atomic_when_a_pool_is_short():
    alloc, cache = setup(full=32, swa=2)
    kv = cache.admit(TOKENS[:30], cache.match(TOKENS[:30]))
    with pytest.raises(OutOfKVMemory):
        cache.extend_remote(kv, 30)  # needs 3 SWA pages, the pool has 2
    assert alloc.available() == alloc.total()
    assert (kv.alloc_len, kv.frontier) == (0, 0)
    cache.check_integrity([kv])
    cache.release(kv)
