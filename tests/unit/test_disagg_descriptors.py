"""Descriptors: exact (src, dst, length) triples for small layouts, run merging, batching,
byte counters, validation, the staged layout; and a byte-exact replay with memmove
between two real KV pools (no transfer engine)."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

from swakv.config import AttentionSpec, AttnKind, KVLayout
from swakv.disagg.descriptors import (
    Descriptor,
    DescriptorError,
    KVRegions,
    LayoutMismatch,
    TensorRegion,
    build_descriptors,
    kv_tensors,
    page_runs,
    span_slot_ids,
    staged_descriptors,
    staged_nbytes,
)
from swakv.disagg.plan import plan_transfer, row_pages, swa_row_pages
from swakv.memory.allocator import SWAAllocator
from swakv.memory.kv_pool import KVPool
from swakv.memory.pages import swa_tail_len

P = 4  # page size of the small layouts


def small_layout(dtype=torch.float32, window: int = 3) -> KVLayout:
    """Layers: sliding, full, sliding. Full: 2 heads x 4 (32 B/slot in fp32); sliding:
    1 head x 4 (16 B/slot)."""
    sw = AttentionSpec(AttnKind.SLIDING, 1, 4, 10_000.0, window=window)
    full = AttentionSpec(AttnKind.FULL, 2, 4, 1_000_000.0)
    return KVLayout(layers=(sw, full, sw), dtype=dtype)


def test_page_runs_merge_only_when_both_sides_advance() -> None:
    first, src, dst, n = page_runs(np.array([5, 6, 7, 9]), np.array([20, 21, 30, 31]))
    assert first.tolist() == [0, 2, 3]
    assert src.tolist() == [5, 7, 9]
    assert dst.tolist() == [20, 30, 31]
    assert n.tolist() == [2, 1, 1]
    # one side going backwards or repeating breaks a run
    _, _, _, n = page_runs(np.array([1, 2, 3, 4]), np.array([8, 9, 9, 10]))
    assert n.tolist() == [2, 2]
    assert [a.size for a in page_runs(np.zeros(0, np.int64), np.zeros(0, np.int64))] == [0] * 4


def test_exact_descriptors_small_layout() -> None:
    """Page 4, W 3, L 10, prefix 0: full span [0, 10) = 3 pages (last holds 2 tokens),
    SWA span [4, 10) = 2 pages (last holds 2 tokens)."""
    src_pool = KVPool(small_layout(), SWAAllocator(8, 6, P))
    dst_pool = KVPool(small_layout(), SWAAllocator(8, 6, P))
    src, dst = KVRegions.of(src_pool), KVRegions.of(dst_pool)
    plan = plan_transfer(0, 10, 3, P)
    descs = build_descriptors(src, dst, plan,
                              np.array([1, 2, 5]), np.array([3, 4, 5]),   # full
                              np.array([2, 3]), np.array([5, 4]))         # SWA
    full_page, swa_page = P * 32, P * 16  # bytes per page per tensor
    expected = []
    for s, d in zip(src.full, dst.full):  # K then V of the one full layer
        # pages 1,2 -> 3,4 merge (8 tokens); page 5 -> 5 holds the 2 last tokens
        expected += [Descriptor(s.addr + 1 * full_page, d.addr + 3 * full_page, 8 * 32),
                     Descriptor(s.addr + 5 * full_page, d.addr + 5 * full_page, 2 * 32)]
    for s, d in zip(src.swa, dst.swa):  # K0, V0, K1, V1 of the two sliding layers
        # 2 -> 5 then 3 -> 4: the destination goes backwards, no merge
        expected += [Descriptor(s.addr + 2 * swa_page, d.addr + 5 * swa_page, 4 * 16),
                     Descriptor(s.addr + 3 * swa_page, d.addr + 4 * swa_page, 2 * 16)]
    assert descs.as_tuples() == expected
    assert descs.pool_ids.tolist() == [0] * 4 + [1] * 8
    # bytes: L x full bytes per token, tail x SWA bytes per token
    assert descs.bytes_by_pool() == {"full": 10 * 2 * 32, "swa": 6 * 4 * 16}
    assert src.bytes_per_token("full") == 64 and src.bytes_per_token("swa") == 64


def test_regions_follow_pool_tensors_in_k_v_order() -> None:
    pool = KVPool(small_layout(), SWAAllocator(8, 6, P))
    regions = KVRegions.of(pool)
    assert [r.addr for r in regions.full] == [pool.full_k[0].data_ptr(), pool.full_v[0].data_ptr()]
    assert [r.addr for r in regions.swa] == [
        pool.swa_k[0].data_ptr(), pool.swa_v[0].data_ptr(),
        pool.swa_k[1].data_ptr(), pool.swa_v[1].data_ptr()]
    assert regions.full[0] == TensorRegion(pool.full_k[0].data_ptr(), 9 * P, 32)
    assert regions.swa[0] == TensorRegion(pool.swa_k[0].data_ptr(), 7 * P, 16)
    full, swa = kv_tensors(pool)
    assert full[1] is pool.full_v[0] and swa[2] is pool.swa_k[1]


def test_batches_split_in_order_with_bytes_per_pool() -> None:
    pool_a = KVPool(small_layout(), SWAAllocator(8, 6, P))
    pool_b = KVPool(small_layout(), SWAAllocator(8, 6, P))
    descs = build_descriptors(KVRegions.of(pool_a), KVRegions.of(pool_b), plan_transfer(0, 10, 3, P),
                              np.array([1, 2, 5]), np.array([3, 4, 5]),
                              np.array([2, 3]), np.array([5, 4]))
    batches = descs.batches(max_slices=5)
    assert [len(b) for b in batches] == [5, 5, 2]
    # batch 0: the 4 full descriptors and the first SWA one (4 tokens x 16 B)
    assert batches[0].bytes_by_pool == (("full", 640), ("swa", 64))
    assert batches[1].bytes_by_pool == (("full", 0), ("swa", 32 + 64 + 32 + 64 + 32))
    assert batches[2].bytes_by_pool == (("full", 0), ("swa", 64 + 32))
    flat = [t for b in batches for t in zip(b.src_addrs, b.dst_addrs, b.lengths)]
    assert flat == [tuple(d) for d in descs.as_tuples()]
    assert sum(b.nbytes for b in batches) == 640 + 384
    assert len(descs.batches()) == 1  # default limit 1024
    with pytest.raises(DescriptorError):
        descs.batches(0)


def test_empty_spans_make_no_descriptors() -> None:
    pool_a = KVPool(small_layout(), SWAAllocator(8, 6, P))
    pool_b = KVPool(small_layout(), SWAAllocator(8, 6, P))
    plan = plan_transfer(8, 8, 3, P)  # prefix == L
    descs = build_descriptors(KVRegions.of(pool_a), KVRegions.of(pool_b), plan,
                              [], [], [], [])
    assert len(descs) == 0 and descs.bytes_by_pool() == {"full": 0, "swa": 0}
    assert descs.batches() == ()


def test_validation_errors() -> None:
    pool_a = KVPool(small_layout(), SWAAllocator(8, 6, P))
    pool_b = KVPool(small_layout(), SWAAllocator(8, 6, P))
    a, b = KVRegions.of(pool_a), KVRegions.of(pool_b)
    plan = plan_transfer(0, 10, 3, P)
    full, swa = np.array([1, 2, 3]), np.array([1, 2])
    with pytest.raises(DescriptorError, match=r"destination pages must be in \[1, 9\)"):
        build_descriptors(a, b, plan, full, np.array([0, 1, 2]), swa, swa)  # padding page
    with pytest.raises(DescriptorError, match=r"destination pages must be in \[1, 7\)"):
        build_descriptors(a, b, plan, full, full, swa, np.array([1, 7]))  # past the SWA pool
    with pytest.raises(DescriptorError, match="has 3 pages, got 2 src"):
        build_descriptors(a, b, plan, full[:2], full, swa, swa)
    other = KVRegions.of(KVPool(small_layout(torch.bfloat16), SWAAllocator(8, 6, P)))
    with pytest.raises(LayoutMismatch, match="32 vs 16 bytes per slot"):
        build_descriptors(a, other, plan, full, full, swa, swa)
    with pytest.raises(LayoutMismatch, match="page size 4 vs 2"):
        a.check_compatible(KVRegions(2, a.full, a.swa))
    with pytest.raises(LayoutMismatch, match="swa pool: 4 tensors vs 2"):
        a.check_compatible(KVRegions(P, a.full, a.swa[:2]))
    with pytest.raises(LayoutMismatch, match="plan page size 2"):
        build_descriptors(a, b, plan_transfer(0, 10, 3, 2), full, full, swa, swa)
    with pytest.raises(DescriptorError, match="not contiguous"):
        TensorRegion.of(torch.zeros(8, 4).t())
    with pytest.raises(DescriptorError, match="invalid tensor region"):
        TensorRegion(0, 8, 4)


def test_span_slot_ids_and_staged_layout() -> None:
    plan = plan_transfer(0, 10, 3, P)  # SWA span [4, 10): pages 1, 2 of the row
    assert span_slot_ids(np.array([7, 2]), plan.swa).tolist() == [28, 29, 30, 31, 8, 9]
    with pytest.raises(DescriptorError):
        span_slot_ids(np.array([7]), plan.swa)
    regions = KVRegions.of(KVPool(small_layout(), SWAAllocator(8, 6, P)))
    assert staged_nbytes(regions, plan) == (10 * 64, 6 * 64)
    descs = staged_descriptors(1000, 5000, (640, 384), chunk_bytes=256)
    assert descs.as_tuples() == [
        Descriptor(1000, 5000, 256), Descriptor(1256, 5256, 256), Descriptor(1512, 5512, 128),
        Descriptor(1640, 5640, 256), Descriptor(1896, 5896, 128)]
    assert descs.bytes_by_pool() == {"full": 640, "swa": 384}


def replay(descs) -> None:
    """Apply descriptors with memmove (both pools are CPU tensors in this process)."""
    for d in descs.as_tuples():
        ctypes.memmove(d.dst_addr, d.src_addr, d.length)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("prefix", [0, 8, 20])
def test_replay_moves_exactly_the_planned_kv(dtype, prefix) -> None:
    """Real allocators on both sides with shuffled free lists; after replaying the
    descriptors the receiver holds the sender's KV at every full position of
    [prefix, L) and every SWA position of the tail, and nothing else changed."""
    page, window, seq_len = P, 6, 23
    layout = small_layout(dtype, window)
    gen = torch.Generator().manual_seed(prefix)

    def churned_pool(seed: int) -> KVPool:
        a = SWAAllocator(24, 16, page)
        rng = np.random.default_rng(seed)
        # every page taken alone (16 with SWA pages, 8 without), then freed in random
        # order: both FIFO free lists become permutations
        rows = [a.alloc(page) for _ in range(16)]
        rows += [a.alloc_extend_swa_tail(page, 0) for _ in range(8)]
        for i in rng.permutation(len(rows)):
            a.free(rows[int(i)])
        return KVPool(layout, a)

    src_pool, dst_pool = churned_pool(1), churned_pool(2)
    for t in src_pool.full_k + src_pool.full_v + src_pool.swa_k + src_pool.swa_v:
        t.copy_(torch.randn(t.shape, generator=gen).to(dtype))
    plan = plan_transfer(prefix, seq_len, window, page)
    src_row = src_pool.allocator.alloc(seq_len)
    dst_row = dst_pool.allocator.alloc_extend_swa_tail(seq_len, swa_tail_len(seq_len, window, page))
    src_full, dst_full = row_pages(src_row, plan.full), row_pages(dst_row, plan.full)
    src_swa = swa_row_pages(src_row, plan.swa, src_pool.allocator.full_to_swa_page)
    dst_swa = swa_row_pages(dst_row, plan.swa, dst_pool.allocator.full_to_swa_page)
    if prefix == 0:  # non-trivial page lists: several runs in both pools
        assert len(page_runs(src_full, dst_full)[0]) > 2
        assert len(page_runs(src_swa, dst_swa)[0]) > 1

    descs = build_descriptors(KVRegions.of(src_pool), KVRegions.of(dst_pool), plan,
                              src_full, dst_full, src_swa, dst_swa)
    replay(descs)

    full_bpt = layout.bytes_per_token(sliding=False)
    swa_bpt = layout.bytes_per_token(sliding=True)
    assert descs.bytes_by_pool() == {"full": (seq_len - prefix) * full_bpt,
                                     "swa": plan.swa.num_tokens * swa_bpt}
    full_pos = torch.arange(prefix, seq_len)
    swa_pos = torch.arange(plan.swa.start, seq_len)
    for layer in range(3):
        sk, sv = src_pool.buffers(layer)
        dk, dv = dst_pool.buffers(layer)
        if src_pool.layer_is_swa[layer]:
            s_slots = src_pool.allocator.translate(src_row[swa_pos])
            d_slots = dst_pool.allocator.translate(dst_row[swa_pos])
        else:
            s_slots, d_slots = src_row[full_pos], dst_row[full_pos]
        for s, d in ((sk, dk), (sv, dv)):
            assert torch.equal(d[d_slots], s[s_slots])
            untouched = torch.ones(d.shape[0], dtype=torch.bool)
            untouched[d_slots] = False
            assert not d[untouched].any()  # the receiver started from zeros
