"""Attention metadata (exact gather slots and masks) and the attention kernels."""

from __future__ import annotations

import pytest
import torch

from swakv.config import AttentionSpec, AttnKind, KVLayout
from swakv.memory import KVPool, ReqTable, SWAAllocator
from swakv.model.attention import (
    EXTEND_BLOCK,
    EXTEND_BLOCK_PAIRS,
    UnmappedWindow,
    attend,
    build_attention_metadata,
)
from swakv.model.rope import RopeKey, apply_rope, inv_freq, rope_cos_sin

NEG = float("-inf")


def _setup(page: int = 1) -> tuple[SWAAllocator, ReqTable]:
    """Row 0 holds full slots 1..10 (positions 0..9), row 1 slots 11..18 (0..7)."""
    alloc = SWAAllocator(num_full_pages=40 // page, num_swa_pages=40 // page, page_size=page)
    table = ReqTable(num_rows=2, max_context=32)
    table.write(table.alloc_row(), 0, alloc.alloc(10))
    table.write(table.alloc_row(), 0, alloc.alloc(8))
    return alloc, table


def test_metadata_decode_and_extend_exact_slots() -> None:
    alloc, table = _setup()
    # decode at position 9 of row 0, extend of positions 5..7 of row 1; W = 4
    meta = build_attention_metadata([(0, 9, 1), (1, 5, 3)], table.slots, alloc, window=4)
    assert meta.positions.tolist() == [9, 5, 6, 7]
    assert meta.full.write_slots.tolist() == [10, 16, 17, 18]
    assert meta.sliding is not None
    assert meta.sliding.write_slots.tolist() == [10, 16, 17, 18]  # fresh pools: identity map

    dec = meta.full.decode
    assert dec is not None and dec.tokens == slice(0, 1) and dec.mask is None
    assert (dec.rows.tolist(), dec.key_lo.tolist(), dec.key_hi.tolist()) == ([0], [0], [10])
    assert dec.key_slots.tolist() == [list(range(1, 11))]
    sdec = meta.sliding.decode
    assert sdec is not None and (sdec.key_lo.tolist(), sdec.key_hi.tolist()) == ([6], [10])
    assert sdec.key_slots.tolist() == [[7, 8, 9, 10]] and sdec.mask is None

    (full_item,) = meta.full.extends
    assert full_item.key_pos == 0 and full_item.key_slots.tolist() == list(range(11, 19))
    (full_blk,) = full_item.blocks
    assert (full_blk.tok_lo, full_blk.tok_hi, full_blk.q_pos) == (1, 4, 5)
    assert (full_blk.key_lo, full_blk.key_hi, full_blk.key_pos) == (0, 8, 0)
    assert full_blk.mask is not None
    assert full_blk.mask.int().tolist() == [
        [1, 1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1, 1, 1],
    ]
    (swa_item,) = meta.sliding.extends
    assert swa_item.key_pos == 2 and swa_item.key_slots.tolist() == list(range(13, 19))  # 2..7
    (swa_blk,) = swa_item.blocks
    assert (swa_blk.key_lo, swa_blk.key_hi, swa_blk.key_pos) == (0, 6, 2)
    assert swa_blk.mask is not None
    assert swa_blk.mask.int().tolist() == [
        [1, 1, 1, 1, 0, 0],  # query 5 sees 2..5
        [0, 1, 1, 1, 1, 0],  # query 6 sees 3..6
        [0, 0, 1, 1, 1, 1],  # query 7 sees 4..7
    ]


def test_metadata_decode_padding_repeats_own_slot() -> None:
    alloc, table = _setup()
    meta = build_attention_metadata([(1, 2, 1), (0, 9, 1)], table.slots, alloc, window=4)
    assert meta.sliding is not None
    dec = meta.sliding.decode
    assert dec is not None and dec.mask is not None
    assert dec.key_slots.tolist() == [[11, 12, 13, 13], [7, 8, 9, 10]]
    assert dec.mask[:, 0, 0].tolist() == [[0.0, 0.0, 0.0, NEG], [0.0, 0.0, 0.0, 0.0]]


def test_metadata_extend_blocks_cover_only_the_window() -> None:
    alloc, table = _setup()
    meta = build_attention_metadata([(0, 0, 10)], table.slots, alloc, window=3, block=4)
    assert meta.sliding is not None
    (item,) = meta.sliding.extends
    spans = [(b.tok_lo, b.tok_hi, item.key_slots[b.key_lo : b.key_hi].tolist())
             for b in item.blocks]
    # queries 0..3 see keys 0..3; 4..7 see 2..7; 8..9 see 6..9 (slots = position + 1)
    assert spans == [(0, 4, [1, 2, 3, 4]), (4, 8, [3, 4, 5, 6, 7, 8]), (8, 10, [7, 8, 9, 10])]
    (full_item,) = meta.full.extends
    assert [(b.tok_lo, b.key_hi - b.key_lo) for b in full_item.blocks] == [(0, 4), (4, 8), (8, 10)]


def test_extend_blocks_shrink_for_long_full_prefixes() -> None:
    """Blocks of a long full-attention prefix stay under the pair budget (>= 32 queries)."""
    alloc = SWAAllocator(num_full_pages=6000, num_swa_pages=6000, page_size=1)
    table = ReqTable(num_rows=1, max_context=5120)
    table.write(table.alloc_row(), 0, alloc.alloc(5120))
    meta = build_attention_metadata([(0, 4096, 1024)], table.slots, alloc, window=512)
    (item,) = meta.full.extends
    sizes = [b.tok_hi - b.tok_lo for b in item.blocks]
    assert sum(sizes) == 1024 and item.blocks[0].tok_lo == 0
    assert all(a.tok_hi == b.tok_lo for a, b in zip(item.blocks, item.blocks[1:]))
    assert max(sizes) == EXTEND_BLOCK_PAIRS // (4096 + EXTEND_BLOCK) < EXTEND_BLOCK
    assert all(n * (b.key_hi - b.key_lo) <= EXTEND_BLOCK_PAIRS for n, b in zip(sizes, item.blocks))
    assert meta.sliding is not None
    (swa,) = meta.sliding.extends
    assert swa.key_pos == 4096 - 511
    assert [b.tok_hi - b.tok_lo for b in swa.blocks] == [EXTEND_BLOCK] * (1024 // EXTEND_BLOCK)


def test_validate_rejects_unmapped_window() -> None:
    alloc, table = _setup(page=2)
    alloc.free_swa(table.read(0, 0, 6))  # positions 0..5 lose SWA
    # decode at 9 with W = 4 needs 6..9: fine; W = 5 needs 5: unmapped
    build_attention_metadata([(0, 9, 1)], table.slots, alloc, window=4, validate=True)
    with pytest.raises(UnmappedWindow):
        build_attention_metadata([(0, 9, 1)], table.slots, alloc, window=5, validate=True)
    with pytest.raises(UnmappedWindow):
        build_attention_metadata([(0, 6, 3)], table.slots, alloc, window=5, validate=True)


def _naive(q, k, v, visible, scale, softcap):
    """Reference attention: q [nq, H, D], k/v [K, KVH, D], visible bool [nq, K]."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    s = s.masked_fill(~visible[None], NEG)
    return torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), v).reshape(q.shape[0], -1)


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("window", [None, 3])
def test_attend_matches_naive_reference(softcap: float | None, window: int | None) -> None:
    """Mixed batch: decode at 9 (row 0), extend 5..7 (row 1); keys read back from the pool."""
    heads, kv_heads, dim = 4, 2, 8
    kind = AttnKind.SLIDING if window else AttnKind.FULL
    spec = AttentionSpec(kind, kv_heads, dim, 10_000.0, window=window)
    alloc, table = _setup()
    pool = KVPool(KVLayout((spec,)), alloc)
    g = torch.Generator().manual_seed(0)
    hist_k = {r: torch.randn(10, kv_heads, dim, generator=g) for r in (0, 1)}
    hist_v = {r: torch.randn(10, kv_heads, dim, generator=g) for r in (0, 1)}
    for r, n in ((0, 9), (1, 5)):  # earlier positions already in the pool
        slots = table.read(r, 0, n)
        slots = alloc.translate(slots) if window else slots
        pool.write(0, slots, hist_k[r][:n], hist_v[r][:n])
    for t in pool.swa_k + pool.swa_v + pool.full_k + pool.full_v:
        t[0] = float("nan")  # padding page
    meta = build_attention_metadata([(0, 9, 1), (1, 5, 3)], table.slots, alloc, window=window)
    plan = meta.sliding if window else meta.full
    assert plan is not None
    q = torch.randn(4, heads, dim, generator=g)
    k = torch.cat([hist_k[0][9:10], hist_k[1][5:8]])
    v = torch.cat([hist_v[0][9:10], hist_v[1][5:8]])
    out = attend(0, q, k, v, plan, pool, scale=0.3, softcap=softcap)
    for tok, (r, pos) in enumerate([(0, 9), (1, 5), (1, 6), (1, 7)]):
        kp = torch.arange(pos + 1)
        visible = (kp > pos - window) if window else torch.ones(pos + 1, dtype=torch.bool)
        ref = _naive(q[tok : tok + 1], hist_k[r][: pos + 1], hist_v[r][: pos + 1],
                     visible[None], 0.3, softcap)
        torch.testing.assert_close(out[tok : tok + 1], ref, atol=1e-5, rtol=1e-5)


def test_rope_matches_rotate_half_form() -> None:
    key = RopeKey(theta=10_000.0, factor=2.0, head_dim=8)
    freq = inv_freq(key)
    ref_freq = 1.0 / (10_000.0 ** (torch.arange(0, 8, 2).float() / 8)) / 2.0
    torch.testing.assert_close(freq, ref_freq, atol=0, rtol=0)
    pos = torch.tensor([0, 3, 100])
    cos, sin = rope_cos_sin(freq, pos, torch.float32)
    x = torch.randn(3, 2, 8)
    emb = pos[:, None].float() * freq[None]
    full_cos, full_sin = torch.cat([emb, emb], -1).cos(), torch.cat([emb, emb], -1).sin()
    rot = torch.cat([-x[..., 4:], x[..., :4]], -1)
    ref = x * full_cos[:, None] + rot * full_sin[:, None]
    torch.testing.assert_close(apply_rope(x, cos, sin), ref, atol=0, rtol=0)
