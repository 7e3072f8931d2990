"""Attention over the hybrid KV pools for a batch mixing extends and decodes.

A forward pass runs a flat batch of T tokens. Item i of the batch owns tokens
[t_i, t_i + n_i) at positions [P_i, P_i + n_i) of request row r_i (P_i = prefix_len);
the engine has already put their full slots into `row_slots[r_i, P_i : P_i + n_i]`.

Every layer first writes its new K/V, then reads keys by position:
- full layers: slots `row[j]` for j in [0, pos] from the full pool;
- sliding layers (window W): slots `translate(row[j])` for j in (pos - W, pos] from
  the SWA pool. Only those positions are ever gathered: SWA pages below the window
  may already be freed and reused by another request.

`build_attention_metadata` computes, once per forward and per kind of layer, the
write slots and the gather indices / masks; every layer of that kind reuses them.
Decodes (n_i == 1) are batched into one padded gather [B, K]: padding columns
repeat the query's own slot (always written, finite) and are masked with -inf, so
a masked column can never inject NaN. Extends run SDPA per block of at most
`block` queries over exactly the key range the block can see.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from swakv.memory.allocator.swa import SWAAllocator
from swakv.memory.kv_pool import KVPool

EXTEND_BLOCK = 256  # queries per SDPA call for extends


class UnmappedWindow(Exception):
    """A sliding layer would read a window position whose SWA page is not mapped."""


@dataclass(frozen=True)
class DecodeGroup:
    """All single-token items of one forward, for one kind of layer.

    `tokens`: their indices in the flat batch ([B] tensor, or a slice when they are
    contiguous). `key_slots`: [B, K] pool slots of the keys each query sees, padded.
    `mask`: fp32 [B, 1, 1, K], 0 for visible keys and -inf for padding; None when
    nothing is padded.
    """

    tokens: torch.Tensor | slice
    key_slots: torch.Tensor
    mask: torch.Tensor | None


@dataclass(frozen=True)
class ExtendBlock:
    """Queries [tok_lo, tok_hi) of the flat batch (one item, consecutive positions).

    `key_slots`: [K] pool slots of key positions [key_lo, key_lo + K) of the item's
    row. `mask`: bool [tok_hi - tok_lo, K], True where the query sees the key; None
    when every query sees every key.
    """

    tok_lo: int
    tok_hi: int
    key_slots: torch.Tensor
    mask: torch.Tensor | None


@dataclass(frozen=True)
class KindMetadata:
    """Write slots ([T], in this kind's pool) and read plan for one kind of layer."""

    write_slots: torch.Tensor
    decode: DecodeGroup | None
    extends: tuple[ExtendBlock, ...]


@dataclass(frozen=True)
class AttentionMetadata:
    """Everything a forward's layers need: positions [T] and one plan per kind."""

    positions: torch.Tensor
    full: KindMetadata
    sliding: KindMetadata | None

    @property
    def num_tokens(self) -> int:
        return int(self.positions.numel())


def build_attention_metadata(
    items: Sequence[tuple[int, int, int]],
    row_slots: torch.Tensor,
    allocator: SWAAllocator,
    window: int | None,
    block: int = EXTEND_BLOCK,
    validate: bool = False,
) -> AttentionMetadata:
    """Plan a forward over `items` = (row, prefix_len, num_new) in batch order.

    `row_slots` is the request table ([rows, max_context] full slots). With
    `validate`, raise UnmappedWindow if a sliding read would hit an unmapped page
    (an engine bug: the frontier rule keeps the window mapped).
    Example, W = 4: a decode at position 9 reads sliding keys at positions 6..9 and
    full keys at 0..9; an extend of positions 5..7 reads sliding keys 2..7 with query
    5 masked to 2..5.
    """
    if not items:
        raise ValueError("empty batch")
    rows = torch.tensor([it[0] for it in items], dtype=torch.int64)
    starts = torch.tensor([it[1] for it in items], dtype=torch.int64)
    lens = torch.tensor([it[2] for it in items], dtype=torch.int64)
    if bool((lens < 1).any()) or bool((starts < 0).any()):
        raise ValueError("every item needs prefix_len >= 0 and at least one new token")
    total = int(lens.sum())
    if total == len(items):  # all decodes: one token per item
        positions, tok_rows = starts, rows
    else:
        first_tok = torch.cumsum(lens, 0) - lens
        offsets = torch.arange(total) - torch.repeat_interleave(first_tok, lens)
        positions = torch.repeat_interleave(starts, lens) + offsets
        tok_rows = torch.repeat_interleave(rows, lens)
    full_write = row_slots[tok_rows, positions]

    kinds = [(None, full_write)]
    if window is not None:
        kinds.append((window, allocator.translate(full_write)))
    plans = []
    for w, write in kinds:
        decode = _decode_group(items, rows, starts, lens, row_slots, allocator, w, validate)
        extends = _extend_blocks(items, row_slots, allocator, w, block, validate)
        plans.append(KindMetadata(write, decode, extends))
    return AttentionMetadata(positions, plans[0], plans[1] if len(plans) > 1 else None)


def _to_pool(
    full_slots: torch.Tensor,
    allocator: SWAAllocator,
    window: int | None,
    validate: bool,
) -> torch.Tensor:
    """Pool slots of `full_slots` for a full (window None) or sliding layer."""
    if window is None:
        return full_slots
    if validate and not bool(allocator.is_swa_mapped(full_slots).all()):
        raise UnmappedWindow("a sliding layer would read an unmapped SWA page in its window")
    return allocator.translate(full_slots)


def _decode_group(
    items: Sequence[tuple[int, int, int]],
    rows: torch.Tensor,
    starts: torch.Tensor,
    lens: torch.Tensor,
    row_slots: torch.Tensor,
    allocator: SWAAllocator,
    window: int | None,
    validate: bool,
) -> DecodeGroup | None:
    """Padded gather for single-token items: query at pos sees [lo, pos], where
    lo = 0 (full) or max(0, pos - W + 1) (sliding); padding repeats pos."""
    is_dec = lens == 1
    num = int(is_dec.sum())
    if num == 0:
        return None
    first_tok = torch.cumsum(lens, 0) - lens
    if num == len(items):
        tokens: torch.Tensor | slice = slice(0, num)
        pos, r = starts, rows
    else:
        idx = torch.nonzero(is_dec).flatten()
        tok = first_tok[idx]
        lo, hi = int(tok[0]), int(tok[-1]) + 1
        tokens = slice(lo, hi) if hi - lo == num else tok
        pos, r = starts[idx], rows[idx]
    lo_pos = torch.zeros_like(pos) if window is None else (pos - window + 1).clamp(min=0)
    count = pos - lo_pos + 1
    width = int(count.max())
    cols = torch.arange(width)[None, :]
    valid = cols < count[:, None]
    positions = torch.where(valid, lo_pos[:, None] + cols, pos[:, None])
    full = row_slots[r[:, None], positions]
    slots = _to_pool(full, allocator, window, validate)
    mask = None
    if not bool(valid.all()):
        mask = torch.zeros(valid.shape, dtype=torch.float32).masked_fill_(~valid, float("-inf"))
        mask = mask[:, None, None, :]
    return DecodeGroup(tokens, slots, mask)


def _extend_blocks(
    items: Sequence[tuple[int, int, int]],
    row_slots: torch.Tensor,
    allocator: SWAAllocator,
    window: int | None,
    block: int,
    validate: bool,
) -> tuple[ExtendBlock, ...]:
    """Blocks of <= `block` queries for items with n > 1.

    Queries at positions [q0, q1) see keys [k0, q1) with k0 = 0 (full) or
    max(0, q0 - W + 1) (sliding); the mask keeps k <= q (and k > q - W).
    """
    blocks = []
    tok = 0
    for row, prefix, n in items:
        if n > 1:
            for a0 in range(0, n, block):
                a1 = min(n, a0 + block)
                q0, q1 = prefix + a0, prefix + a1
                k0 = 0 if window is None else max(0, q0 - window + 1)
                slots = _to_pool(row_slots[row, k0:q1], allocator, window, validate)
                qp = torch.arange(q0, q1)[:, None]
                kp = torch.arange(k0, q1)[None, :]
                visible = kp <= qp
                if window is not None:
                    visible &= kp > qp - window
                mask = None if bool(visible.all()) else visible
                blocks.append(ExtendBlock(tok + a0, tok + a1, slots, mask))
        tok += n
    return tuple(blocks)


def attend(
    layer_id: int,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: KindMetadata,
    kv_pool: KVPool,
    scale: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """Write k, v of the batch's new tokens, then attend; returns [T, heads * head_dim].

    q: [T, heads, head_dim]; k, v: [T, kv_heads, head_dim]; `plan` is the metadata of
    this layer's kind. Heads are grouped as in HF `repeat_kv`: query head h uses KV
    head h // (heads / kv_heads).
    """
    kv_pool.write(layer_id, plan.write_slots, k, v)
    kb, vb = kv_pool.buffers(layer_id)
    num_tokens, heads, dim = q.shape
    dec = plan.decode
    if dec is not None and not plan.extends:
        return _decode(q[dec.tokens], kb, vb, dec, scale, softcap)
    out = torch.empty(num_tokens, heads * dim, dtype=q.dtype)
    if dec is not None:
        out[dec.tokens] = _decode(q[dec.tokens], kb, vb, dec, scale, softcap)
    for blk in plan.extends:
        out[blk.tok_lo : blk.tok_hi] = _extend(q[blk.tok_lo : blk.tok_hi], kb, vb, blk, scale, softcap)
    return out


def _decode(
    q: torch.Tensor,
    kb: torch.Tensor,
    vb: torch.Tensor,
    group: DecodeGroup,
    scale: float,
    softcap: float | None,
) -> torch.Tensor:
    """q [B, heads, D] against the padded gather; returns [B, heads * D]."""
    b, width = group.key_slots.shape
    _, heads, dim = q.shape
    kv_heads = kb.shape[1]
    flat = group.key_slots.reshape(-1)
    k = kb.index_select(0, flat).view(b, width, kv_heads, dim).to(q.dtype)
    v = vb.index_select(0, flat).view(b, width, kv_heads, dim).to(q.dtype)
    qg = q.reshape(b, kv_heads, heads // kv_heads, dim)
    scores = torch.matmul(qg, k.permute(0, 2, 3, 1)) * scale  # [B, kv_heads, G, K]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if group.mask is not None:
        scores = scores + group.mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs, v.transpose(1, 2))  # [B, kv_heads, G, D]
    return out.reshape(b, heads * dim)


def _extend(
    q: torch.Tensor,
    kb: torch.Tensor,
    vb: torch.Tensor,
    blk: ExtendBlock,
    scale: float,
    softcap: float | None,
) -> torch.Tensor:
    """q [nq, heads, D] of one block against its key range; returns [nq, heads * D]."""
    nq, heads, dim = q.shape
    kv_heads = kb.shape[1]
    k = kb.index_select(0, blk.key_slots).to(q.dtype).transpose(0, 1)[None]  # [1, kvh, K, D]
    v = vb.index_select(0, blk.key_slots).to(q.dtype).transpose(0, 1)[None]
    qh = q.transpose(0, 1)[None]  # [1, heads, nq, D]
    if softcap is None:
        out = F.scaled_dot_product_attention(
            qh, k, v, attn_mask=blk.mask, scale=scale, enable_gqa=kv_heads != heads
        )
    else:
        group = heads // kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = torch.matmul(qh, k.transpose(-1, -2)) * scale
        scores = torch.tanh(scores / softcap) * softcap
        if blk.mask is not None:
            scores = scores.masked_fill(~blk.mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, v)
    return out[0].transpose(0, 1).reshape(nq, heads * dim)
