"""Decode-side preallocation: two budgets, FIFO waiting, NeverFits, host-copy restore
(real allocator, cache, pools and scheduler at tiny sizes; no model)."""

from __future__ import annotations

import pytest
import torch

from swakv.cache import PrefixCache
from swakv.config import AttentionSpec, AttnKind, KVLayout
from swakv.disagg.pd_sched import DecodeScheduler
from swakv.disagg.prealloc import NeverFits, Pending, Preallocator, copy_suffix, covered_start
from swakv.memory import Need, ReqTable, SWAAllocator
from swakv.memory.kv_pool import KVPool
from swakv.memory.pages import page_ceil
from swakv.sampling_params import SamplingParams
from swakv.sched.cost import CostModel
from swakv.sched.request import Request

P, W = 4, 8
PARAMS = SamplingParams(temperature=0, max_tokens=8)


def layout() -> KVLayout:
    sw = AttentionSpec(AttnKind.SLIDING, 1, 4, 10_000.0, window=W)
    full = AttentionSpec(AttnKind.FULL, 1, 4, 10_000.0)
    return KVLayout(layers=(sw, full))


def build(full_pages=64, swa_pages=32, reserve=8, tail=True):
    alloc = SWAAllocator(full_pages, swa_pages, P)
    cache = PrefixCache(alloc, ReqTable(8, 256), P, W)
    cost = CostModel(W, P, 16, reserve, 4)
    pool = KVPool(layout(), alloc)
    copies = []
    sched = DecodeScheduler(cost, cache, 8, pool, lambda r, c: copies.append((r, c)))
    return Preallocator(cost, cache, sched, pool, tail=tail), alloc


def request(n: int, start: int = 100, max_tokens: int = 8) -> Request:
    return Request(list(range(start, start + n)), SamplingParams(temperature=0,
                                                                   max_tokens=max_tokens), 256)


@pytest.mark.parametrize("mask,start,want", [
    ("FFFFFTTTTTTT", 0, 8), ("TTTTTTTTTTTT", 0, 0), ("FFFFTTTTTTTT", 4, 4),
    ("TTTFTTTTTTTT", 0, 4), ("FFFFFFFFFFFT", 0, 12),
])
def test_covered_start(mask, start, want):
    bools = torch.tensor([c == "T" for c in mask])
    assert covered_start(bools, start, len(mask), P) == want


def test_copy_suffix_keeps_the_positions_and_their_swa_rows():
    pre, alloc = build()
    slots = alloc.alloc_extend_swa_tail(20, 8)  # SWA for [12, 20)
    pool = pre.kv_pool
    for t in pool.full_k + pool.swa_k:
        t.copy_(torch.randn(t.shape))
    copy = pool.cpu_copy(slots)
    part = copy_suffix(copy, 8)
    assert part.num_tokens == 12 and part.swa_mask.tolist() == [False] * 4 + [True] * 8
    assert torch.equal(part.full_k[0], copy.full_k[0][8:])
    assert torch.equal(part.swa_k[0], copy.swa_k[0])  # [8, 12) had no SWA rows
    assert torch.equal(copy_suffix(copy, 16).swa_k[0], copy.swa_k[0][4:])


def test_preallocates_full_pages_and_the_swa_tail():
    pre, alloc = build()
    req = request(30)
    kv = pre.try_admit(Pending(req, peer="p"))
    assert kv is not None and (kv.kv_len, kv.alloc_len, kv.frontier) == (0, 30, 20)
    assert alloc.available() == alloc.total() - Need(32, 12)
    assert req.request_id in pre.scheduler.held
    # held outstanding: need once decoding (31 tokens + reserve 7, one steady window)
    need = pre.cost.need_for(31, 7, 0)
    assert pre.held_outstanding(req) == need - Need(32, 12)
    assert pre.budget() == alloc.available() - pre.held_outstanding(req)
    pre.cache.check_integrity(pre.scheduler.live_kvs())
    pre.drop(req, insert=False)
    assert alloc.available() == alloc.total() and not pre.scheduler.held


@pytest.mark.parametrize("short", ["full", "swa"])
def test_requests_wait_while_either_budget_is_short(short):
    steady = page_ceil(W + P + 4, P)  # 16 SWA tokens a decoding request may hold
    if short == "full":
        pre, alloc = build(full_pages=18, swa_pages=64)  # 72 tokens: need 40 each
    else:
        pre, alloc = build(full_pages=256, swa_pages=steady // P + 2)
    first, second = request(30, 100), request(30, 300)
    assert pre.try_admit(Pending(first, peer="p")) is not None
    available = alloc.available()
    assert pre.try_admit(Pending(second, peer="p")) is None  # nothing taken, nothing held
    assert alloc.available() == available and list(pre.scheduler.held) == [first.request_id]
    assert second.kv is None
    assert getattr(pre.budget(), short) < getattr(pre.cost.need_for(31, 7, 0), short)
    pre.drop(first, insert=False)
    assert pre.try_admit(Pending(second, peer="p")) is not None


def test_naive_layout_maps_swa_for_the_whole_prompt_and_fits_fewer():
    tail, _ = build(swa_pages=16)
    naive, _ = build(swa_pages=16, tail=False)
    fitted = []
    for pre in (tail, naive):
        n = 0
        while pre.try_admit(Pending(request(40, 1000 * n), peer="p")) is not None:
            n += 1
        fitted.append(n)
    assert fitted == [4, 1]  # 64 SWA tokens: 4 steady windows vs one 40-token prompt


def test_a_request_that_never_fits_is_refused():
    pre, alloc = build(full_pages=8)
    with pytest.raises(NeverFits):
        pre.try_admit(Pending(request(60), peer="p"))
    assert alloc.available() == alloc.total() and not pre.scheduler.held


def test_restore_from_copy_reproduces_the_kv_the_next_query_reads():
    pre, alloc = build()
    pool, cache = pre.kv_pool, pre.cache
    req = request(30)
    req.token_ids.append(7)  # decoding: kv_len 30, next input at position 30
    kv = pre.try_admit(Pending(req, copy=None, peer="p"))
    gen = torch.Generator().manual_seed(0)
    for t in pool.full_k + pool.full_v + pool.swa_k + pool.swa_v:
        t.copy_(torch.randn(t.shape, generator=gen))
    row = cache.req_table.read(kv.row, 0, 30).clone()
    want_full = pool.full_k[0][row].clone()
    want_swa = pool.swa_k[0][alloc.translate(row[20:])].clone()
    copy = pool.cpu_copy(row)
    pre.drop(req, insert=False)  # the KV is gone from the pools' bookkeeping
    for t in pool.full_k + pool.swa_k:
        t.zero_()
    item = Pending(req, copy=copy)
    assert item.seq_len == 30 and item.remaining_after == req.max_new_tokens
    kv = pre.try_admit(item)
    pre.restore_from_copy(item)
    assert req in pre.scheduler.running and kv.kv_len == 30 and kv.frontier == 20
    new_row = cache.req_table.read(kv.row, 0, 30)
    assert torch.equal(pool.full_k[0][new_row], want_full)
    assert torch.equal(pool.swa_k[0][alloc.translate(new_row[20:])], want_swa)
    cache.check_integrity(pre.scheduler.live_kvs())
