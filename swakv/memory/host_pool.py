"""Host KV pools (the HiCache tier): full and SWA pools in host memory, and their sizing.

Layout mirrors `KVPool`: per layer K and V tensors `[num_slots, kv_heads, head_dim]`,
full layers in the full host pool, sliding layers in the SWA host pool (with their own
head shape), same dtype. Slots `[0, page_size)` (page 0) are padding and never handed
out, so host page ids, like device page ids, are `1..num_pages`.

Ownership: the two `PageFreeList`s here are the only owners of free host pages; an
allocated host page belongs to whoever `alloc` returned it to (the host tier's tree)
until it is given back with `free`. The two pools are independent: unlike the device
allocator there is no full->SWA page mapping here (a node records both page lists).
Page ids go in and out as int64 CPU tensors.

Tensors are on the CPU, pinned when the device pools are on CUDA (so copies to and
from the device can be asynchronous).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from swakv.config import KVLayout
from swakv.memory.allocator.base import InvalidFree, PageFreeList, as_numpy
from swakv.memory.pages import Need
from swakv.memory.sizes import PoolSizes


class InvalidHostKVMemory(ValueError):
    """A `--host-kv-memory` setting that is neither a size, a multiple like '4x', nor off."""


class HostPoolTooSmall(ValueError):
    """The host KV budget cannot hold one page of each pool the model uses."""


class OutOfHostKVMemory(Exception):
    """A host allocation did not fit; nothing was taken from either host pool.

    `need_pages` and `available_pages` are `Need`s counted in pages (not tokens).
    """

    def __init__(self, need_pages: Need, available_pages: Need) -> None:
        super().__init__(
            f"out of host KV memory: need {need_pages} pages, available {available_pages} pages")
        self.need_pages = need_pages
        self.available_pages = available_pages


# ---- sizing --------------------------------------------------------------------------

@dataclass(frozen=True)
class HostKVMemory:
    """A parsed `--host-kv-memory`: exactly one of `multiple` (of the device KV budget)
    and `num_bytes` is set."""

    multiple: float | None = None
    num_bytes: int | None = None

    def budget_bytes(self, device_budget_bytes: int) -> int:
        if self.multiple is not None:
            return int(self.multiple * device_budget_bytes)
        return int(self.num_bytes)  # type: ignore[arg-type]


_MULTIPLE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*x\s*$", re.I)
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*([kmgt]?)(i?)b?\s*$", re.I)
_OFF = ("", "off", "none", "0")


def parse_host_kv_memory(setting: str | int | float | None) -> HostKVMemory | None:
    """Parse a host KV budget; None means the host tier is off.

    Accepted: None, 'off', 'none', '' or 0 (off); '4x' or '2.5x' (a multiple of the device
    KV budget, > 0); a byte size '8GiB', '512MiB', '512M', '1.5e9' (K/M/G/T are decimal
    unless followed by 'i': '512M' = 512e6 bytes, '512MiB' = 512 * 2**20); a plain integer
    of bytes, as a string or an int (a float >= 1 counts as bytes too).
    """
    if setting is None:
        return None
    if isinstance(setting, bool) or not isinstance(setting, (str, int, float)):
        raise InvalidHostKVMemory(f"host KV memory must be a size or a multiple, got {setting!r}")
    if isinstance(setting, (int, float)):
        if setting == 0:
            return None
        if not math.isfinite(setting) or setting < 1:
            raise InvalidHostKVMemory(
                f"host KV memory in bytes must be >= 1, got {setting!r} "
                "(use a string like '4x' for a multiple of the device KV budget)")
        return HostKVMemory(num_bytes=int(setting))
    if setting.strip().lower() in _OFF:
        return None
    m = _MULTIPLE.match(setting)
    if m:
        multiple = float(m.group(1))
        if multiple <= 0:
            raise InvalidHostKVMemory(f"host KV memory multiple must be > 0, got {setting!r}")
        return HostKVMemory(multiple=multiple)
    m = _SIZE.match(setting)
    if not m:
        raise InvalidHostKVMemory(
            f"host KV memory {setting!r} is not a size (8GiB, 512MiB, 1000000) "
            "or a multiple of the device KV budget (4x)")
    unit, binary = m.group(2).lower(), m.group(3)
    power = " kmgt".index(unit) if unit else 0
    num_bytes = int(float(m.group(1)) * (1024 if binary else 1000) ** power)
    if num_bytes < 1:
        raise InvalidHostKVMemory(f"host KV memory must be at least 1 byte, got {setting!r}")
    return HostKVMemory(num_bytes=num_bytes)


@dataclass(frozen=True)
class HostPoolSizes(PoolSizes):
    """Sizes of the host pools (same fields as the device pools' `PoolSizes`)."""

    _kind: ClassVar[str] = "host pool"


def host_pool_sizes(
    layout: KVLayout,
    device: PoolSizes,
    host_kv_memory: str | int | float | HostKVMemory | None,
    device_budget_bytes: int | None = None,
) -> HostPoolSizes | None:
    """Host pool sizes for a budget, full:SWA pages in the device pools' ratio; None if off.

    A multiple ('4x') applies to `device_budget_bytes` (default: the device pools' bytes,
    `device.full_bytes + device.swa_bytes`). With bytes per token `bf`, `bs` and device
    pages `Nf`, `Ns`, after both padding pages (`P * (bf + bs)` bytes) the rest `U` buys
    `nf = U * Nf // (P * (Nf * bf + Ns * bs))` full pages and likewise `ns` with `Ns`, so
    `nf : ns ~ Nf : Ns` and the tensors fit the budget. Worked example: '1x' of the device
    pools' own bytes gives exactly `nf = Nf`, `ns = Ns`.
    """
    setting = (host_kv_memory if isinstance(host_kv_memory, HostKVMemory)
               else parse_host_kv_memory(host_kv_memory))
    if setting is None:
        return None
    p = device.page_size
    if device_budget_bytes is None:
        device_budget_bytes = device.full_bytes + device.swa_bytes
    budget = setting.budget_bytes(device_budget_bytes)
    bf, bs = layout.bytes_per_token(sliding=False), layout.bytes_per_token(sliding=True)
    per_unit = p * (device.num_full_pages * bf + device.num_swa_pages * bs)
    usable = budget - p * (bf + bs)
    if per_unit <= 0 or usable <= 0:
        raise HostPoolTooSmall(
            f"host KV budget of {budget} bytes holds no page (padding pages alone take "
            f"{p * (bf + bs)} bytes)")
    nf = usable * device.num_full_pages // per_unit if bf else 0
    ns = usable * device.num_swa_pages // per_unit if bs else 0
    if (bf and nf < 1) or (bs and device.num_swa_pages and ns < 1):
        raise HostPoolTooSmall(
            f"host KV budget of {budget} bytes gives {nf} full and {ns} SWA host pages of "
            f"{p} tokens; need at least 1 of each")
    return HostPoolSizes(nf, ns, p, (nf + 1) * p * bf, (ns + 1) * p * bs)


# ---- pool ----------------------------------------------------------------------------

@dataclass(frozen=True)
class HostPages:
    """Host page ids taken by one `alloc`: int64 CPU tensors, in hand-out order."""

    full_pages: torch.Tensor
    swa_pages: torch.Tensor


class HostKVPool:
    """Owns the host KV bytes and the host page free lists of both pools."""

    def __init__(self, layout: KVLayout, sizes: HostPoolSizes,
                 device: torch.device | str = "cpu") -> None:
        """`device` is where the device pools live; the host tensors are pinned iff CUDA."""
        self.layout = layout
        self.page_size = sizes.page_size
        self.sizes = sizes
        self.pinned = torch.device(device).type == "cuda"
        self.layer_is_swa = tuple(a.is_sliding for a in layout.layers)
        self.layer_index = layout.index_in_pool  # global layer -> index in its pool
        self.full = PageFreeList(sizes.num_full_pages)
        self.swa = PageFreeList(sizes.num_swa_pages)
        self.full_k, self.full_v, self.swa_k, self.swa_v = self._make()

    def _make(self) -> tuple[list[torch.Tensor], ...]:
        """Per-layer K and V views of one flat host buffer (one pinned allocation, not one
        per tensor). Left uninitialised (host pools are large) except the padding page."""
        shapes = []  # (is_sliding, shape) for K then V of every layer, in layer order
        for a in self.layout.layers:
            slots = self.num_swa_slots if a.is_sliding else self.num_full_slots
            shapes += [(a.is_sliding, (slots, a.num_kv_heads, a.head_dim))] * 2
        total = sum(math.prod(shape) for _, shape in shapes)
        flat = torch.empty(total, dtype=self.layout.dtype, pin_memory=self.pinned)
        views: dict[bool, tuple[list[torch.Tensor], list[torch.Tensor]]] = {
            False: ([], []), True: ([], [])}
        offset = 0
        for i, (sliding, shape) in enumerate(shapes):
            t = flat[offset:offset + math.prod(shape)].view(shape)
            t[: self.page_size].zero_()
            views[sliding][i % 2].append(t)  # even: K, odd: V
            offset += math.prod(shape)
        return (*views[False], *views[True])

    # ---- sizes ---------------------------------------------------------------------
    @property
    def num_full_pages(self) -> int:
        return self.full.num_pages

    @property
    def num_swa_pages(self) -> int:
        return self.swa.num_pages

    @property
    def num_full_slots(self) -> int:
        """Slots in the full host tensors, padding page included."""
        return (self.full.num_pages + 1) * self.page_size

    @property
    def num_swa_slots(self) -> int:
        return (self.swa.num_pages + 1) * self.page_size

    def total(self) -> Need:
        """Usable capacity in tokens."""
        return Need(self.full.num_pages * self.page_size, self.swa.num_pages * self.page_size)

    def available(self) -> Need:
        """Free capacity in tokens (whole pages)."""
        return Need(self.full.num_free * self.page_size, self.swa.num_free * self.page_size)

    def available_pages(self) -> Need:
        return Need(self.full.num_free, self.swa.num_free)

    def nbytes(self) -> tuple[int, int]:
        """(full host pool bytes, SWA host pool bytes) of the KV tensors."""
        full = sum(t.numel() * t.element_size() for t in self.full_k + self.full_v)
        swa = sum(t.numel() * t.element_size() for t in self.swa_k + self.swa_v)
        return full, swa

    def buffers(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, V) host tensors of global layer `layer_id`, indexed by that host pool's slots."""
        i = self.layer_index[layer_id]
        if self.layer_is_swa[layer_id]:
            return self.swa_k[i], self.swa_v[i]
        return self.full_k[i], self.full_v[i]

    # ---- allocation ----------------------------------------------------------------
    def can_alloc(self, num_full_pages: int, num_swa_pages: int) -> bool:
        return num_full_pages <= self.full.num_free and num_swa_pages <= self.swa.num_free

    def alloc(self, num_full_pages: int, num_swa_pages: int) -> HostPages:
        """Take pages from both host pools, or nothing and raise OutOfHostKVMemory."""
        if num_full_pages < 0 or num_swa_pages < 0:
            raise ValueError(f"page counts must be >= 0, got {num_full_pages}, {num_swa_pages}")
        if not self.can_alloc(num_full_pages, num_swa_pages):
            raise OutOfHostKVMemory(Need(num_full_pages, num_swa_pages), self.available_pages())
        return HostPages(self.full.take(num_full_pages), self.swa.take(num_swa_pages))

    def free(self, full_pages: torch.Tensor | np.ndarray, swa_pages: torch.Tensor | np.ndarray) -> None:
        """Give allocated pages back to both host pools, or nothing and raise InvalidFree.

        InvalidFree: a page repeated within the call, already free, page 0 or out of range.
        """
        full, swa = _distinct(full_pages, "full"), _distinct(swa_pages, "SWA")
        self.full.validate_give(full)
        self.swa.validate_give(swa)
        self.full.give(full)  # both validated: neither give can fail now
        self.swa.give(swa)

    def check_integrity(self) -> None:
        """Free lists consistent; every layer's K/V has its kind's shape, dtype and pinning."""
        self.full.check_integrity()
        self.swa.check_integrity()
        slots = {False: self.num_full_slots, True: self.num_swa_slots}
        for layer_id, a in enumerate(self.layout.layers):
            assert self.layer_is_swa[layer_id] == a.is_sliding, f"layer {layer_id} routed wrong"
            for t in self.buffers(layer_id):
                assert t.shape == (slots[a.is_sliding], a.num_kv_heads, a.head_dim), (
                    f"host layer {layer_id}: KV shape {tuple(t.shape)}")
                assert t.dtype == self.layout.dtype, f"host layer {layer_id}: dtype {t.dtype}"
                assert t.device.type == "cpu", f"host layer {layer_id} on {t.device}"
                assert t.is_pinned() == self.pinned, f"host layer {layer_id}: pinning"


def _distinct(pages: torch.Tensor | np.ndarray, pool: str) -> np.ndarray:
    pages = as_numpy(pages).reshape(-1)
    if np.unique(pages).size != pages.size:
        raise InvalidFree(f"{pool} host pages repeated in one free: {pages[:8].tolist()}")
    return pages
