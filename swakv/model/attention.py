"""Attention over the hybrid KV pools for a batch mixing extends and decodes.

A forward pass runs a flat batch of T tokens. Item i of the batch owns tokens
[t_i, t_i + n_i) at positions [P_i, P_i + n_i) of request row r_i (P_i = prefix_len);
the engine has already put their full slots into `row_slots[r_i, P_i : P_i + n_i]`.

Every layer first writes its new K/V, then reads keys by position:
- full layers: slots `row[j]` for j in [0, pos] from the full pool;
- sliding layers (window W): slots `translate(row[j])` for j in (pos - W, pos] from
  the SWA pool. Only those positions are ever read: SWA pages below the window may
  already be freed and reused by another request.

`build_attention_metadata` plans, once per forward and per kind of layer, the write
slots and what each query reads; every layer of that kind reuses the plan.

Decodes (n_i == 1) are described by (row, key_lo, key_hi) only. On CPU the C++ kernel
`swakv.paged_decode` walks each query's visible positions through the request table
(and, for sliding layers, the full->SWA page map) and reads K/V rows in place. The
torch path (other devices, or no compiler) gathers a padded [B, K] slot matrix, built
lazily once per forward: padding columns repeat the query's own slot (always written,
finite) and are masked with -inf, so a masked column never injects NaN.

Extends (n_i > 1) gather the item's key range once per layer and run blocks of
queries as two GEMMs per KV head with the G query heads sharing it stacked:
scores [G * nq, K] = Q [G * nq, D] x K^T, where each block's key range is exactly the
positions its queries see. Scores and softmax are fp32 (bf16 on CPU: the C++
`swakv.qk_scores_bf16` dot kernel; elsewhere an fp32 GEMM); the softmax touches only
each row's visible columns (C++ `swakv.masked_softmax_out` on CPU; a boolean mask on
the torch path); P x V runs in q's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache, cached_property

import torch

from swakv.kernels.cpu_build import cpu_kernels_available
from swakv.memory.allocator.swa import SWAAllocator
from swakv.memory.kv_pool import KVPool

EXTEND_BLOCK = 128  # most queries per extend block
# most query-key pairs per extend block: bounds the scores buffer (x heads) of long
# full-attention prefixes; blocks keep at least MIN_EXTEND_BLOCK queries
EXTEND_BLOCK_PAIRS = 1 << 18
MIN_EXTEND_BLOCK = 32
BACKENDS = ("auto", "torch")
_backend = "auto"


class UnmappedWindow(Exception):
    """A sliding layer would read a window position whose SWA page is not mapped."""


def set_backend(name: str) -> None:
    """"auto": C++ kernels for CPU pools when they build, else torch; "torch": torch only."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    _backend = name


def _use_kernels(pool_tensor: torch.Tensor) -> bool:
    return (
        _backend == "auto"
        and pool_tensor.device.type == "cpu"
        and pool_tensor.dtype in (torch.float32, torch.bfloat16)
        and cpu_kernels_available()
    )


@dataclass(frozen=True)
class SlotMap:
    """How a kind of layer turns full slots into its pool's slots.

    `page_map` None: identity (full layers). Else SWA slot of full slot s is
    `page_map[s // page_size] * page_size + s % page_size` (the allocator's live
    full->SWA page map, int64 on the host).
    """

    page_map: torch.Tensor | None
    page_size: int

    def __call__(self, full_slots: torch.Tensor) -> torch.Tensor:
        if self.page_map is None:
            return full_slots
        pm = self.page_map.to(full_slots.device)
        p = self.page_size
        return pm[full_slots // p] * p + full_slots % p


@dataclass(frozen=True)
class DecodeGroup:
    """All single-token items of one forward, for one kind of layer.

    `tokens`: their indices in the flat batch ([B] tensor, or a slice when they are
    contiguous). Query b sees key positions [key_lo[b], key_hi[b]) of request row
    rows[b] (int64 [B] each; key_hi = pos + 1). `row_slots` is the request table.
    """

    tokens: torch.Tensor | slice
    rows: torch.Tensor
    key_lo: torch.Tensor
    key_hi: torch.Tensor
    row_slots: torch.Tensor
    slot_map: SlotMap

    @cached_property
    def padded(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(key_slots [B, K] pool slots, mask fp32 [B, 1, 1, K] or None) for the torch
        path: column c of query b is position key_lo + c while that is < key_hi, else
        the query's own position (masked with -inf)."""
        count = self.key_hi - self.key_lo
        width = int(count.max())
        cols = torch.arange(width)[None, :]
        valid = cols < count[:, None]
        positions = torch.where(valid, self.key_lo[:, None] + cols, self.key_hi[:, None] - 1)
        slots = self.slot_map(self.row_slots[self.rows[:, None], positions])
        mask = None
        if not bool(valid.all()):
            mask = torch.zeros(valid.shape, dtype=torch.float32).masked_fill_(~valid, float("-inf"))
            mask = mask[:, None, None, :]
        return slots, mask

    @property
    def key_slots(self) -> torch.Tensor:
        return self.padded[0]

    @property
    def mask(self) -> torch.Tensor | None:
        return self.padded[1]


@dataclass(frozen=True)
class ExtendBlock:
    """Queries [tok_lo, tok_hi) of the flat batch, at positions [q_pos, q_pos + nq).

    They read keys [key_lo, key_hi) of their item's `key_slots`, i.e. positions
    [item.key_pos + key_lo, item.key_pos + key_hi): the union of what they see.
    """

    tok_lo: int
    tok_hi: int
    q_pos: int
    key_lo: int
    key_hi: int
    key_pos: int  # position of the block's first key
    window: int | None

    @cached_property
    def mask(self) -> torch.Tensor | None:
        """Bool [nq, key_hi - key_lo], True where the query sees the key; None if all."""
        qp = torch.arange(self.q_pos, self.q_pos + self.tok_hi - self.tok_lo)[:, None]
        kp = torch.arange(self.key_pos, self.key_pos + self.key_hi - self.key_lo)[None, :]
        visible = kp <= qp
        if self.window is not None:
            visible &= kp > qp - self.window
        return None if bool(visible.all()) else visible


@dataclass(frozen=True)
class ExtendItem:
    """One item with n > 1 new tokens: `key_slots` [q_pos + n - key_pos] are the pool
    slots of key positions [key_pos, q_pos + n), gathered once per forward."""

    key_pos: int
    key_slots: torch.Tensor
    blocks: tuple[ExtendBlock, ...]


@dataclass(frozen=True)
class KindMetadata:
    """Write slots ([T], in this kind's pool) and read plan for one kind of layer."""

    write_slots: torch.Tensor
    decode: DecodeGroup | None
    extends: tuple[ExtendItem, ...]


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
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
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

    kinds: list[tuple[int | None, SlotMap]] = [(None, SlotMap(None, 1))]
    if window is not None:
        kinds.append((window, SlotMap(allocator.full_to_swa_page, allocator.page_size)))
    plans = []
    for w, slot_map in kinds:
        decode = _decode_group(items, rows, starts, lens, row_slots, slot_map, w)
        extends = _extend_items(items, row_slots, slot_map, w, block)
        if validate and w is not None:
            _check_mapped(allocator, row_slots, decode, items, w)
        write = full_write if w is None else slot_map(full_write)
        plans.append(KindMetadata(write, decode, extends))
    return AttentionMetadata(positions, plans[0], plans[1] if len(plans) > 1 else None)


def _check_mapped(
    allocator: SWAAllocator,
    row_slots: torch.Tensor,
    decode: DecodeGroup | None,
    items: Sequence[tuple[int, int, int]],
    window: int,
) -> None:
    """Raise UnmappedWindow unless every position a sliding query reads is SWA-mapped."""
    reads = []
    if decode is not None:
        count = decode.key_hi - decode.key_lo
        cols = torch.arange(int(count.max()))[None, :]
        pos = torch.minimum(decode.key_lo[:, None] + cols, decode.key_hi[:, None] - 1)
        reads.append(row_slots[decode.rows[:, None], pos].reshape(-1))
    for row, prefix, n in items:
        if n > 1:
            reads.append(row_slots[row, max(0, prefix - window + 1) : prefix + n])
    if reads and not bool(allocator.is_swa_mapped(torch.cat(reads)).all()):
        raise UnmappedWindow("a sliding layer would read an unmapped SWA page in its window")


def _decode_group(
    items: Sequence[tuple[int, int, int]],
    rows: torch.Tensor,
    starts: torch.Tensor,
    lens: torch.Tensor,
    row_slots: torch.Tensor,
    slot_map: SlotMap,
    window: int | None,
) -> DecodeGroup | None:
    """Single-token items: the query at pos sees [lo, pos], lo = 0 (full) or
    max(0, pos - W + 1) (sliding)."""
    is_dec = lens == 1
    num = int(is_dec.sum())
    if num == 0:
        return None
    if num == len(items):
        tokens: torch.Tensor | slice = slice(0, num)
        pos, r = starts, rows
    else:
        idx = torch.nonzero(is_dec).flatten()
        tok = (torch.cumsum(lens, 0) - lens)[idx]
        lo, hi = int(tok[0]), int(tok[-1]) + 1
        tokens = slice(lo, hi) if hi - lo == num else tok
        pos, r = starts[idx], rows[idx]
    key_lo = torch.zeros_like(pos) if window is None else (pos - window + 1).clamp(min=0)
    return DecodeGroup(tokens, r, key_lo, pos + 1, row_slots, slot_map)


def _extend_items(
    items: Sequence[tuple[int, int, int]],
    row_slots: torch.Tensor,
    slot_map: SlotMap,
    window: int | None,
    block: int,
) -> tuple[ExtendItem, ...]:
    """Items with n > 1, cut into blocks of queries [q0, q1) that see keys [k0, q1)
    with k0 = 0 (full) or max(0, q0 - W + 1) (sliding).

    A block has at most `block` queries and, once it has MIN_EXTEND_BLOCK, at most
    EXTEND_BLOCK_PAIRS query-key pairs (long full-attention prefixes)."""
    out = []
    tok = 0
    for row, prefix, n in items:
        if n > 1:
            key_pos = 0 if window is None else max(0, prefix - window + 1)
            blocks = []
            a0 = 0
            while a0 < n:
                q0 = prefix + a0
                k0 = 0 if window is None else max(0, q0 - window + 1)
                nq = min(block, max(MIN_EXTEND_BLOCK, EXTEND_BLOCK_PAIRS // (q0 + block - k0)))
                a1 = min(n, a0 + nq)
                blocks.append(
                    ExtendBlock(tok + a0, tok + a1, q0, k0 - key_pos, prefix + a1 - key_pos, k0, window)
                )
                a0 = a1
            slots = slot_map(row_slots[row, key_pos : prefix + n])
            out.append(ExtendItem(key_pos, slots, tuple(blocks)))
        tok += n
    return tuple(out)


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
    kernels = q.dtype == kb.dtype and _use_kernels(kb)
    dec = plan.decode
    if dec is not None and not plan.extends:
        return _decode(q[dec.tokens], kb, vb, dec, scale, softcap, kernels)
    out = torch.empty(num_tokens, heads * dim, dtype=q.dtype, device=q.device)
    if dec is not None:
        out[dec.tokens] = _decode(q[dec.tokens], kb, vb, dec, scale, softcap, kernels)
    for item in plan.extends:
        _extend(q, kb, vb, item, scale, softcap, kernels, out)
    return out


def _decode(
    q: torch.Tensor,
    kb: torch.Tensor,
    vb: torch.Tensor,
    group: DecodeGroup,
    scale: float,
    softcap: float | None,
    kernels: bool,
) -> torch.Tensor:
    """q [B, heads, D] against each query's visible keys; returns [B, heads * D]."""
    if kernels:
        smap = group.slot_map
        page_map = smap.page_map if smap.page_map is not None else _NO_PAGE_MAP
        return torch.ops.swakv.paged_decode(
            q.contiguous(), kb, vb, group.row_slots, group.rows, group.key_lo, group.key_hi,
            page_map, smap.page_size, scale, softcap or 0.0,
        )
    key_slots, mask = group.padded
    b, width = key_slots.shape
    _, heads, dim = q.shape
    kv_heads = kb.shape[1]
    flat = key_slots.reshape(-1).to(kb.device)
    k = kb.index_select(0, flat).view(b, width, kv_heads, dim).to(q.dtype)
    v = vb.index_select(0, flat).view(b, width, kv_heads, dim).to(q.dtype)
    qg = q.reshape(b, kv_heads, heads // kv_heads, dim)
    scores = torch.matmul(qg, k.permute(0, 2, 3, 1)).float() * scale  # [B, kv_heads, G, K]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores + mask.to(scores.device)
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    out = torch.matmul(probs, v.transpose(1, 2))  # [B, kv_heads, G, D]
    return out.reshape(b, heads * dim)


_NO_PAGE_MAP = torch.empty(0, dtype=torch.int64)


def _extend(
    q: torch.Tensor,
    kb: torch.Tensor,
    vb: torch.Tensor,
    item: ExtendItem,
    scale: float,
    softcap: float | None,
    kernels: bool,
    out: torch.Tensor,
) -> None:
    """Attention of one extend item's queries, written into out[tok_lo:tok_hi].

    bf16 with AVX512-BF16 (head_dim a multiple of 32) takes the fused kernel
    (`_flash_extend`). Otherwise, per block and KV head h, the block's stacked query
    matrix [nq * G, D] has row i * G + g for query i and head h * G + g. Scores are fp32 (bf16 inputs: exact products summed in
    fp32 by the C++ bf16 dot kernel over keys packed once per item, or an fp32 GEMM);
    probabilities are cast to q's dtype for the P x V GEMM. Keys are read through
    row-strided views of the item's gathered rows (no per-block copies)."""
    _, heads, dim = q.shape
    kv_heads = kb.shape[1]
    group = heads // kv_heads
    slots = item.key_slots.to(kb.device)
    k_all = kb.index_select(0, slots).to(q.dtype)  # [K, kvh, D]
    v_all = vb.index_select(0, slots).to(q.dtype)
    bf16_dot = kernels and q.dtype == torch.bfloat16 and _bf16_dot_supported()
    if bf16_dot and _flash_fits(dim):
        _flash_extend(q, k_all, v_all, item, group, scale, softcap, out)
        return
    for h in range(kv_heads):
        packed = torch.ops.swakv.pack_keys_bf16(k_all[:, h]) if bf16_dot else None
        for blk in item.blocks:
            nq = blk.tok_hi - blk.tok_lo
            qs = q[blk.tok_lo : blk.tok_hi, h * group : (h + 1) * group].reshape(nq * group, dim)
            if packed is not None:
                scores = torch.ops.swakv.qk_scores_bf16(qs, packed, blk.key_lo, blk.key_hi)
            else:
                k_h = k_all[blk.key_lo : blk.key_hi, h]  # [Kb, D], rows kvh * D apart
                scores = torch.mm(qs.float(), k_h.float().t())  # [nq * G, Kb]
            if kernels:
                dst = scores if scores.dtype == q.dtype else torch.empty_like(scores, dtype=q.dtype)
                probs = torch.ops.swakv.masked_softmax_out(
                    scores, dst, group, nq * group, blk.q_pos, blk.key_pos, blk.window or 0,
                    scale, softcap or 0.0,
                )
            else:
                probs = _masked_softmax(scores, blk, group, scale, softcap).to(q.dtype)
            o = torch.mm(probs, v_all[blk.key_lo : blk.key_hi, h])  # [nq * G, D]
            out[blk.tok_lo : blk.tok_hi, h * group * dim : (h + 1) * group * dim] = o.view(nq, group * dim)


def _flash_fits(dim: int) -> bool:
    return dim % 32 == 0


def _flash_extend(q: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor, item: ExtendItem,
                  group: int, scale: float, softcap: float | None, out: torch.Tensor) -> None:
    """bf16: each KV head's queries of the whole item in one fused kernel (QK, online
    softmax and P x V per 8 stacked query rows, 128 keys a step, no score matrix); each
    query reads only the keys it sees, so the item's blocks are not needed."""
    first, last = item.blocks[0], item.blocks[-1]
    n, dim = last.tok_hi - first.tok_lo, q.shape[2]
    window = first.window or 0
    for h in range(k_all.shape[1]):
        heads = slice(h * group, (h + 1) * group)
        dst = out[first.tok_lo : last.tok_hi, h * group * dim : (h + 1) * group * dim].view(n, group, dim)
        torch.ops.swakv.flash_extend_bf16(
            q[first.tok_lo : last.tok_hi, heads],
            torch.ops.swakv.pack_keys_bf16(k_all[:, h]),
            torch.ops.swakv.pack_values_bf16(v_all[:, h]),
            dst, first.q_pos, item.key_pos, window, scale, softcap or 0.0,
        )


@cache
def _bf16_dot_supported() -> bool:
    return bool(torch.ops.swakv.bf16_dot_supported())


def _masked_softmax(
    scores: torch.Tensor, blk: ExtendBlock, group: int, scale: float, softcap: float | None
) -> torch.Tensor:
    """Torch path of `swakv.masked_softmax_out`: fp32 probabilities [nq * G, Kb]."""
    s = scores * scale
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    if blk.mask is not None:
        num_keys = s.shape[-1]
        hidden = ~blk.mask.to(s.device)
        s = s.view(-1, group, num_keys).masked_fill(hidden[:, None, :], float("-inf"))
        s = s.view(-1, num_keys)
    return torch.softmax(s, dim=-1)
