"""Per-layer K/V tensors for the full pool and the SWA pool.

A layer-kind table routes each global layer id to its pool and its index there.
Full pool tensors: [num_full_slots, kv_heads, head_dim]; SWA pool tensors:
[num_swa_slots, kv_heads, head_dim] (sliding layers may have their own shape).
Slot 0..page_size-1 is padding (page 0): gathers through unmapped positions read it.
Writes and reads take slots already translated to the layer's pool.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from swakv.config import KVLayout
from swakv.kernels.cpu_build import cpu_kernels_available
from swakv.memory.allocator.swa import SWAAllocator
from swakv.memory.host_memory import zeroed_tensor


class KVCopyMismatch(Exception):
    """load_cpu_copy was asked to restore SWA KV the copy does not hold."""


@dataclass(frozen=True)
class KVCopy:
    """KV of one sequence in host memory.

    `full_k[i]`/`full_v[i]`: [n, kv_heads, head_dim] for the i-th full layer, all n
    positions. `swa_k[j]`/`swa_v[j]`: [m, ...] for the j-th sliding layer, for the m
    positions where `swa_mask` ([n] bool) is True, in position order.
    """

    full_k: tuple[torch.Tensor, ...]
    full_v: tuple[torch.Tensor, ...]
    swa_k: tuple[torch.Tensor, ...]
    swa_v: tuple[torch.Tensor, ...]
    swa_mask: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.swa_mask.numel())


class KVPool:
    """Owns the KV bytes of both pools; slot bookkeeping belongs to the allocator."""

    def __init__(self, layout: KVLayout, allocator: SWAAllocator, device: str = "cpu") -> None:
        self.layout = layout
        self.allocator = allocator
        self.device = torch.device(device)
        self.layer_is_swa = tuple(a.is_sliding for a in layout.layers)
        self.layer_index = layout.index_in_pool  # global layer -> index in its pool
        self.full_k, self.full_v = self._make(False, allocator.num_full_slots)
        self.swa_k, self.swa_v = self._make(True, allocator.num_swa_slots)
        # CPU pools write rows with swakv.write_rows (index_copy_ elsewhere / without it)
        self._row_writer = self.device.type == "cpu" and cpu_kernels_available()

    def _make(self, sliding: bool, num_slots: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-layer K and V, all zeros (gathers of unmapped positions read the padding
        page); see `host_memory.zeroed_tensor`: untouched pages cost no resident memory."""
        ks, vs = [], []
        for a in self.layout.layers:
            if a.is_sliding != sliding:
                continue
            shape = (num_slots, a.num_kv_heads, a.head_dim)
            ks.append(zeroed_tensor(shape, self.layout.dtype, self.device))
            vs.append(zeroed_tensor(shape, self.layout.dtype, self.device))
        return ks, vs

    def buffers(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, V) tensors of global layer `layer_id`, indexed by that pool's slots."""
        i = self.layer_index[layer_id]
        if self.layer_is_swa[layer_id]:
            return self.swa_k[i], self.swa_v[i]
        return self.full_k[i], self.full_v[i]

    def write(self, layer_id: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v ([n, kv_heads, head_dim]) at pool slots (already translated)."""
        kb, vb = self.buffers(layer_id)
        for buf, rows in ((kb, k.to(kb.dtype)), (vb, v.to(vb.dtype))):
            if self._row_writer and slots.device.type == "cpu" and rows[:1].is_contiguous():
                torch.ops.swakv.write_rows(buf, slots, rows)  # one memcpy per row
            else:
                buf.index_copy_(0, slots, rows)

    def check_integrity(self) -> None:
        """Every layer has K and V of its kind's shape, sized to its pool's slots."""
        slots = {False: self.allocator.num_full_slots, True: self.allocator.num_swa_slots}
        for layer_id, a in enumerate(self.layout.layers):
            assert self.layer_is_swa[layer_id] == a.is_sliding, f"layer {layer_id} routed wrong"
            for t in self.buffers(layer_id):
                assert t.shape == (slots[a.is_sliding], a.num_kv_heads, a.head_dim), (
                    f"layer {layer_id}: KV shape {tuple(t.shape)}")
                assert t.dtype == self.layout.dtype, f"layer {layer_id}: dtype {t.dtype}"

    def nbytes(self) -> tuple[int, int]:
        """(full pool bytes, SWA pool bytes) of the KV tensors."""
        full = sum(t.numel() * t.element_size() for t in self.full_k + self.full_v)
        swa = sum(t.numel() * t.element_size() for t in self.swa_k + self.swa_v)
        return full, swa

    def cpu_copy(self, full_slots: torch.Tensor) -> KVCopy:
        """Host copy of a sequence: full KV everywhere, SWA KV where mapped."""
        mask = self.allocator.is_swa_mapped(full_slots).cpu()
        swa_slots = self.allocator.translate(full_slots)[mask.to(full_slots.device)]
        return KVCopy(
            full_k=tuple(t[full_slots].cpu() for t in self.full_k),
            full_v=tuple(t[full_slots].cpu() for t in self.full_v),
            swa_k=tuple(t[swa_slots].cpu() for t in self.swa_k),
            swa_v=tuple(t[swa_slots].cpu() for t in self.swa_v),
            swa_mask=mask,
        )

    def load_cpu_copy(self, copy: KVCopy, new_full_slots: torch.Tensor) -> None:
        """Restore `copy` into a new allocation of the same length.

        The new allocation's SWA-mapped positions must be a subset of `copy.swa_mask`;
        positions the copy holds SWA for but the allocation does not map are dropped.
        """
        if new_full_slots.numel() != copy.num_tokens:
            raise ValueError(f"copy has {copy.num_tokens} tokens, slots {new_full_slots.numel()}")
        new_mask = self.allocator.is_swa_mapped(new_full_slots).cpu()
        if bool((new_mask & ~copy.swa_mask).any()):
            raise KVCopyMismatch("new allocation maps SWA for positions the copy lacks")
        for dst, src in zip(self.full_k + self.full_v, copy.full_k + copy.full_v):
            dst[new_full_slots] = src.to(dst.device)
        keep = new_mask[copy.swa_mask]  # which of the copy's SWA rows are restored
        dst_slots = self.allocator.translate(new_full_slots)[new_mask.to(new_full_slots.device)]
        for dst, src in zip(self.swa_k + self.swa_v, copy.swa_k + copy.swa_v):
            dst[dst_slots] = src[keep].to(dst.device)
