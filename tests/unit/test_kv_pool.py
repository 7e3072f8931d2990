"""KVPool: layer routing, write/read through buffers, nbytes, and host copies."""

from __future__ import annotations

import pytest
import torch

from swakv.config import AttentionSpec, AttnKind, KVLayout
from swakv.memory.allocator import SWAAllocator
from swakv.memory.kv_pool import KVCopy, KVCopyMismatch, KVPool
from swakv.memory.pages import max_frontier, swa_tail_len, swa_tail_start

# 3 layers: sliding, sliding, full; sliding layers have their own head count / dim
SLIDING_HEADS, SLIDING_DIM = 1, 4
FULL_HEADS, FULL_DIM = 2, 8


def layout(dtype: torch.dtype, window: int) -> KVLayout:
    sw = AttentionSpec(AttnKind.SLIDING, SLIDING_HEADS, SLIDING_DIM, 10_000.0, window=window)
    full = AttentionSpec(AttnKind.FULL, FULL_HEADS, FULL_DIM, 1_000_000.0)
    return KVLayout(layers=(sw, sw, full), dtype=dtype)


def make_pool(P: int, W: int, dtype=torch.float32, full_pages=80, swa_pages=60):
    a = SWAAllocator(full_pages, swa_pages, P)
    return KVPool(layout(dtype, W), a), a


def shape(layer: int) -> tuple[int, int]:
    return (FULL_HEADS, FULL_DIM) if layer == 2 else (SLIDING_HEADS, SLIDING_DIM)


def write_random(pool: KVPool, full_slots: torch.Tensor, gen: torch.Generator) -> dict:
    """Write random K/V for every position in every layer; returns what was written."""
    a = pool.allocator
    written = {}
    n = int(full_slots.numel())
    for layer in range(3):
        h, d = shape(layer)
        k = torch.randn(n, h, d, generator=gen)
        v = torch.randn(n, h, d, generator=gen)
        slots = a.translate(full_slots) if pool.layer_is_swa[layer] else full_slots
        pool.write(layer, slots, k, v)
        dt = pool.layout.dtype
        written[layer] = (k.to(dt), v.to(dt))
    return written


def test_layer_routing_shapes_and_nbytes() -> None:
    P, W = 4, 6
    pool, a = make_pool(P, W, full_pages=10, swa_pages=5)
    assert pool.layer_is_swa == (True, True, False)
    assert pool.layer_index == (0, 1, 0)
    assert len(pool.full_k) == 1 and len(pool.swa_k) == 2
    for layer in range(3):
        k, v = pool.buffers(layer)
        slots = a.num_swa_slots if layer < 2 else a.num_full_slots
        assert k.shape == v.shape == (slots, *shape(layer))
        assert k.dtype == torch.float32
    assert pool.buffers(0)[0] is pool.swa_k[0] and pool.buffers(1)[1] is pool.swa_v[1]
    assert pool.buffers(2)[0] is pool.full_k[0]
    full_bytes = (10 + 1) * P * 2 * FULL_HEADS * FULL_DIM * 4  # K+V, one full layer
    swa_bytes = (5 + 1) * P * 2 * 2 * SLIDING_HEADS * SLIDING_DIM * 4  # K+V, two layers
    assert pool.nbytes() == (full_bytes, swa_bytes)
    lay = pool.layout
    assert full_bytes == a.num_full_slots * lay.bytes_per_token(False)
    assert swa_bytes == a.num_swa_slots * lay.bytes_per_token(True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_then_read_via_buffers(dtype: torch.dtype) -> None:
    P, W = 4, 6
    pool, a = make_pool(P, W, dtype)
    gen = torch.Generator().manual_seed(0)
    slots = a.alloc(10)
    written = write_random(pool, slots, gen)
    for layer in range(3):
        kb, vb = pool.buffers(layer)
        s = a.translate(slots) if layer < 2 else slots
        assert kb.dtype == dtype
        assert torch.equal(kb[s], written[layer][0]) and torch.equal(vb[s], written[layer][1])
    # padding page 0 untouched
    for t in pool.full_k + pool.full_v + pool.swa_k + pool.swa_v:
        assert not t[:P].any()


# (P, W, L): swa_tail_start(L) >= max_frontier(L), so a copy taken at the largest
# allowed frontier can be reloaded into a swa-tail allocation. The last four are the
# cases (page 1; L % P == 0 and W % P == 1) where max_frontier is capped by the tail.
ROUND_TRIP = [(4, 3, 23), (4, 6, 23), (4, 4, 16), (16, 8, 57), (16, 20, 70), (16, 40, 130),
              (1, 3, 11), (1, 40, 45), (4, 5, 16), (16, 17, 64)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("P,W,L", ROUND_TRIP)
def test_cpu_copy_round_trip_with_swa_tail(dtype, P: int, W: int, L: int) -> None:
    pool, a = make_pool(P, W, dtype)
    gen = torch.Generator().manual_seed(P * 100 + W)
    src = a.alloc_extend(0, L, None)
    written = write_random(pool, src, gen)
    # advance the frontier as far as the rule allows: the mask is a real tail
    f = max_frontier(L, W, P)
    assert 0 < f < L
    a.free_swa(src[:f])
    copy = pool.cpu_copy(src)
    assert isinstance(copy, KVCopy) and copy.num_tokens == L
    assert copy.swa_mask.tolist() == [i >= f for i in range(L)]
    assert copy.full_k[0].device.type == "cpu" and copy.swa_k[0].shape[0] == L - f
    for layer in range(3):
        k, v = written[layer]
        if layer == 2:
            assert torch.equal(copy.full_k[0], k) and torch.equal(copy.full_v[0], v)
        else:
            assert torch.equal(copy.swa_k[layer], k[f:]) and torch.equal(copy.swa_v[layer], v[f:])
    a.free(src)
    a.check_integrity()

    # a different allocation: take other pages first so the new slots differ
    other = a.alloc(3 * P)
    tail = swa_tail_len(L, W, P)
    start = swa_tail_start(L, W, P)
    dst = a.alloc_extend_swa_tail(L, tail)
    assert not torch.equal(dst, src)
    new_mask = a.is_swa_mapped(dst)
    assert new_mask.tolist() == [i >= start for i in range(L)]
    assert start >= f
    pool.load_cpu_copy(copy, dst)
    for layer in range(3):
        k, v = written[layer]
        kb, vb = pool.buffers(layer)
        if layer == 2:
            assert torch.equal(kb[dst], k) and torch.equal(vb[dst], v)
        else:
            s = a.translate(dst)[start:]
            assert torch.equal(kb[s], k[start:]) and torch.equal(vb[s], v[start:])
    # the other allocation's KV was not touched (still zero)
    assert not pool.full_k[0][other].any()
    assert not pool.swa_k[0][a.translate(other)].any()
    a.check_integrity()


@pytest.mark.parametrize("P", [1, 4, 16])
def test_load_into_allocation_with_more_swa_raises(P: int) -> None:
    W = 3
    pool, a = make_pool(P, W)
    L = 5 * P + 1
    src = a.alloc(L)
    write_random(pool, src, torch.Generator().manual_seed(1))
    f = max_frontier(L, W, P)
    a.free_swa(src[:f])
    copy = pool.cpu_copy(src)
    a.free(src)
    full_before = [t.clone() for t in pool.full_k]
    dst = a.alloc(L)  # maps SWA for every position, the copy lacks [0, f)
    with pytest.raises(KVCopyMismatch):
        pool.load_cpu_copy(copy, dst)
    assert all(torch.equal(x, y) for x, y in zip(pool.full_k, full_before))  # nothing written
    with pytest.raises(ValueError):
        pool.load_cpu_copy(copy, dst[:-1])


def test_load_drops_swa_the_allocation_does_not_map() -> None:
    P, W, L = 4, 3, 20
    pool, a = make_pool(P, W)
    src = a.alloc(L)  # copy keeps SWA for every position
    written = write_random(pool, src, torch.Generator().manual_seed(2))
    copy = pool.cpu_copy(src)
    assert bool(copy.swa_mask.all())
    a.free(src)
    a.alloc(2 * P)
    start = swa_tail_start(L, W, P)
    dst = a.alloc_extend_swa_tail(L, swa_tail_len(L, W, P))
    pool.load_cpu_copy(copy, dst)
    s = a.translate(dst)[start:]
    assert torch.equal(pool.swa_k[1][s], written[1][0][start:])
    assert torch.equal(pool.full_v[0][dst], written[2][1])


def test_check_integrity_catches_a_resized_layer() -> None:
    pool, _ = make_pool(4, 6, torch.float32)
    pool.check_integrity()
    pool.swa_k[0] = pool.swa_k[0][:-1]
    with pytest.raises(AssertionError):
        pool.check_integrity()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_rows_is_index_copy_and_checks_before_writing(dtype: torch.dtype) -> None:
    """`swakv.write_rows` (the CPU pool writer) puts each row where index_copy_ does, from
    strided rows too, and refuses a slot outside the pool, a dtype or a row shape that
    differs, or rows that are not contiguous, leaving the pool untouched."""
    from swakv.kernels.cpu_build import cpu_kernels_available

    assert cpu_kernels_available(), "the C++ kernels must build on this machine"
    gen = torch.Generator().manual_seed(5)
    dst = torch.randn(50, 2, 8, generator=gen).to(dtype)
    fused = torch.randn(6, 40, generator=gen).to(dtype)
    src = fused[:, 8:24].view(6, 2, 8)  # rows 40 elements apart, each row contiguous
    slots = torch.tensor([3, 49, 0, 17, 18, 4])
    want = dst.clone().index_copy_(0, slots, src)
    torch.ops.swakv.write_rows(dst, slots, src)
    assert torch.equal(dst, want)
    before = dst.clone()
    bad = [((dst, torch.tensor([1, 50]), src[:2]), "outside"),
           ((dst, torch.tensor([-1]), src[:1]), "outside"),
           ((dst, torch.tensor([1]), src[:1].double()), "one dtype"),
           ((dst, torch.tensor([1]), src[:1, :1]), "row shape"),
           ((dst, torch.tensor([1, 2]), src.transpose(1, 2).contiguous().transpose(1, 2)[:2]),
            "rows contiguous")]
    for args, match in bad:
        with pytest.raises(RuntimeError, match=match):
            torch.ops.swakv.write_rows(*args)
        assert torch.equal(dst, before)


def test_pool_write_matches_index_copy_path() -> None:
    """KVPool.write through the row writer and through index_copy_ fill the same bytes."""
    gen = torch.Generator().manual_seed(6)
    pools = [make_pool(4, 8, torch.bfloat16)[0] for _ in range(2)]
    assert pools[0]._row_writer
    pools[1]._row_writer = False
    slots = torch.randperm(60, generator=gen)[:11] + 4
    for layer in range(3):
        h, d = shape(layer)
        kv = torch.randn(11, 2 * h, d, generator=gen).bfloat16()
        for pool in pools:
            pool.write(layer, slots, kv[:, :h], kv[:, h:])
    for a, b in zip(pools[0].buffers(2) + pools[0].buffers(0), pools[1].buffers(2) + pools[1].buffers(0)):
        assert torch.equal(a, b)
