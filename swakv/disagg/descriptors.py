"""Byte-range descriptors for moving one request's pages between two workers' KV pools.

A pool tensor is [num_slots, kv_heads, head_dim], contiguous, so slot s occupies
bytes [addr + s * slot_nbytes, addr + (s + 1) * slot_nbytes) and page g (slots
[g * P, (g + 1) * P)) is one contiguous range; a run of consecutive pages is one
range too. Descriptors are (src_addr, dst_addr, length) triples in bytes, built from
addresses and strides only: nothing here reads KV or assumes the tensors' device.

Merging: page i of a span moves from src page `src_pages[i]` to dst page
`dst_pages[i]`; consecutive i whose pages both advance by exactly one form one run
and one descriptor per tensor. Example (page 16, 512 bytes per slot, 8 KiB pages):
src [5, 6, 7, 9], dst [20, 21, 30, 31] -> runs (5->20, 2 pages), (7->30, 1 page),
(9->31, 1 page), i.e. three descriptors per tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from swakv.disagg.plan import PageSpan, TransferPlan, host_int64

if TYPE_CHECKING:
    from swakv.memory.kv_pool import KVPool

POOLS = ("full", "swa")
DEFAULT_MAX_SLICES = 1024  # Mooncake TCP: MC_TCP_MAX_QUEUED_TRANSFERS_PER_PEER default
_MAX_ADDR = 1 << 63  # addresses are held in int64 arrays


class DescriptorError(ValueError):
    """Page lists or regions that cannot form a transfer (lengths, bounds, padding page)."""


class LayoutMismatch(DescriptorError):
    """The two workers' pools disagree (page size, number of tensors, bytes per slot)."""


@dataclass(frozen=True)
class TensorRegion:
    """Where one contiguous pool tensor lives: base address, slots, bytes per slot."""

    addr: int
    num_slots: int
    slot_nbytes: int

    def __post_init__(self) -> None:
        if not 0 < self.addr < _MAX_ADDR or self.num_slots < 1 or self.slot_nbytes < 1:
            raise DescriptorError(f"invalid tensor region {self}")

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorRegion:
        if not tensor.is_contiguous() or tensor.dim() < 1:
            raise DescriptorError(f"pool tensor {tuple(tensor.shape)} is not contiguous")
        slot_nbytes = tensor.stride(0) * tensor.element_size()
        return cls(int(tensor.data_ptr()), int(tensor.shape[0]), int(slot_nbytes))

    @property
    def nbytes(self) -> int:
        return self.num_slots * self.slot_nbytes


@dataclass(frozen=True)
class KVRegions:
    """Every KV tensor of one worker, per pool, in a fixed order both sides share:
    `full` = (K, V) of each full layer in layer order, `swa` likewise for sliding layers.
    """

    page_size: int
    full: tuple[TensorRegion, ...]
    swa: tuple[TensorRegion, ...]

    @classmethod
    def of(cls, pool: KVPool) -> KVRegions:
        """Regions of a `swakv.memory.kv_pool.KVPool`."""
        full, swa = kv_tensors(pool)
        return cls.of_tensors(pool.allocator.page_size, full, swa)

    @classmethod
    def of_tensors(
        cls, page_size: int, full: list[torch.Tensor], swa: list[torch.Tensor]
    ) -> KVRegions:
        return cls(page_size, tuple(map(TensorRegion.of, full)), tuple(map(TensorRegion.of, swa)))

    def pool(self, name: str) -> tuple[TensorRegion, ...]:
        return {"full": self.full, "swa": self.swa}[name]

    def all(self) -> tuple[TensorRegion, ...]:
        return self.full + self.swa

    def bytes_per_token(self, name: str) -> int:
        """Bytes one token occupies across every tensor of pool `name`."""
        return sum(r.slot_nbytes for r in self.pool(name))

    def check_compatible(self, other: KVRegions) -> None:
        """Raise LayoutMismatch unless `other` can exchange pages with this layout."""
        if self.page_size != other.page_size:
            raise LayoutMismatch(f"page size {self.page_size} vs {other.page_size}")
        for name in POOLS:
            mine, theirs = self.pool(name), other.pool(name)
            if len(mine) != len(theirs):
                raise LayoutMismatch(f"{name} pool: {len(mine)} tensors vs {len(theirs)}")
            for i, (a, b) in enumerate(zip(mine, theirs)):
                if a.slot_nbytes != b.slot_nbytes:
                    raise LayoutMismatch(
                        f"{name} tensor {i}: {a.slot_nbytes} vs {b.slot_nbytes} bytes per slot")


def kv_tensors(pool: KVPool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A KVPool's tensors in region order: ([K0, V0, K1, V1, ...] full, same for SWA)."""
    full = [t for kv in zip(pool.full_k, pool.full_v) for t in kv]
    swa = [t for kv in zip(pool.swa_k, pool.swa_v) for t in kv]
    return full, swa


class Descriptor(NamedTuple):
    src_addr: int
    dst_addr: int
    length: int


@dataclass(frozen=True)
class DescriptorBatch:
    """At most `max_slices` descriptors submitted together; bytes per pool they carry."""

    src_addrs: tuple[int, ...]
    dst_addrs: tuple[int, ...]
    lengths: tuple[int, ...]
    bytes_by_pool: tuple[tuple[str, int], ...]

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def nbytes(self) -> int:
        return sum(self.lengths)


@dataclass(frozen=True, eq=False)
class TransferDescriptors:
    """All descriptors of one transfer; `pool_ids[i]` indexes POOLS. Int64 arrays."""

    src_addrs: np.ndarray
    dst_addrs: np.ndarray
    lengths: np.ndarray
    pool_ids: np.ndarray

    def __len__(self) -> int:
        return int(self.lengths.size)

    def as_tuples(self) -> list[Descriptor]:
        return [Descriptor(*t) for t in zip(*(a.tolist() for a in self._arrays()))]

    def bytes_by_pool(self) -> dict[str, int]:
        return {name: int(self.lengths[self.pool_ids == i].sum()) for i, name in enumerate(POOLS)}

    def batches(self, max_slices: int = DEFAULT_MAX_SLICES) -> tuple[DescriptorBatch, ...]:
        """Consecutive batches of at most `max_slices` descriptors, in order."""
        if max_slices < 1:
            raise DescriptorError(f"max_slices must be >= 1, got {max_slices}")
        out = []
        for lo in range(0, len(self), max_slices):
            part = slice(lo, lo + max_slices)
            pools, lengths = self.pool_ids[part], self.lengths[part]
            out.append(DescriptorBatch(
                src_addrs=tuple(self.src_addrs[part].tolist()),
                dst_addrs=tuple(self.dst_addrs[part].tolist()),
                lengths=tuple(lengths.tolist()),
                bytes_by_pool=tuple(
                    (name, int(lengths[pools == i].sum())) for i, name in enumerate(POOLS)),
            ))
        return tuple(out)

    def _arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.src_addrs, self.dst_addrs, self.lengths


def page_runs(src_pages: np.ndarray, dst_pages: np.ndarray) -> tuple[np.ndarray, ...]:
    """Maximal runs where both lists advance by one page.

    Returns (first index into the lists, src first page, dst first page, run length in
    pages), each int64 of one entry per run.
    """
    if src_pages.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty, empty
    breaks = (np.diff(src_pages) != 1) | (np.diff(dst_pages) != 1)
    starts = np.concatenate(([0], np.flatnonzero(breaks) + 1))
    lengths = np.diff(np.concatenate((starts, [src_pages.size])))
    return starts, src_pages[starts], dst_pages[starts], lengths


def _check_pages(pages: np.ndarray, regions: tuple[TensorRegion, ...], page: int, side: str) -> None:
    for r in regions:
        num_pages = r.num_slots // page
        if pages.size and (pages.min() < 1 or pages.max() >= num_pages):
            raise DescriptorError(
                f"{side} pages must be in [1, {num_pages}), got [{pages.min()}, {pages.max()}]")


def span_descriptors(
    src: tuple[TensorRegion, ...],
    dst: tuple[TensorRegion, ...],
    src_pages: np.ndarray,
    dst_pages: np.ndarray,
    span: PageSpan,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(src_addrs, dst_addrs, lengths) moving `span` of every tensor of one pool.

    Tensor-major: all runs of tensor 0, then tensor 1, ... Every page of the span
    carries page_size tokens except the last, which carries span.last_page_tokens.
    """
    src_pages, dst_pages = host_int64(src_pages), host_int64(dst_pages)
    if src_pages.size != span.num_pages or dst_pages.size != span.num_pages:
        raise DescriptorError(
            f"span [{span.start}, {span.end}) has {span.num_pages} pages, "
            f"got {src_pages.size} src and {dst_pages.size} dst pages")
    if len(src) != len(dst):
        raise LayoutMismatch(f"{len(src)} source tensors vs {len(dst)} destination tensors")
    page = span.page_size
    _check_pages(src_pages, src, page, "source")
    _check_pages(dst_pages, dst, page, "destination")
    first, src_first, dst_first, run_pages = page_runs(src_pages, dst_pages)
    # tokens per run: whole pages, minus the unfilled part of the span's last page
    run_tokens = run_pages * page
    if run_tokens.size:
        run_tokens[-1] -= page - span.last_page_tokens
    srcs, dsts, lens = [], [], []
    for s, d in zip(src, dst):
        if s.slot_nbytes != d.slot_nbytes:
            raise LayoutMismatch(f"{s.slot_nbytes} vs {d.slot_nbytes} bytes per slot")
        srcs.append(s.addr + src_first * page * s.slot_nbytes)
        dsts.append(d.addr + dst_first * page * d.slot_nbytes)
        lens.append(run_tokens * s.slot_nbytes)
    if not srcs:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    return np.concatenate(srcs), np.concatenate(dsts), np.concatenate(lens)


def build_descriptors(
    src: KVRegions,
    dst: KVRegions,
    plan: TransferPlan,
    src_full_pages: np.ndarray,
    dst_full_pages: np.ndarray,
    src_swa_pages: np.ndarray,
    dst_swa_pages: np.ndarray,
) -> TransferDescriptors:
    """Descriptors of one request's transfer: the plan's full span, then its SWA span.

    Page lists hold one page per page of the span (plan.full / plan.swa), in position
    order: the source lists come from the sender's row, the destination lists from
    the receiver's preallocation.
    """
    src.check_compatible(dst)
    if plan.page_size != src.page_size:
        raise LayoutMismatch(f"plan page size {plan.page_size} vs pools' {src.page_size}")
    parts = [
        span_descriptors(src.full, dst.full, src_full_pages, dst_full_pages, plan.full),
        span_descriptors(src.swa, dst.swa, src_swa_pages, dst_swa_pages, plan.swa),
    ]
    pool_ids = [np.full(p[2].size, i, dtype=np.int64) for i, p in enumerate(parts)]
    return TransferDescriptors(
        src_addrs=np.concatenate([p[0] for p in parts]).astype(np.int64),
        dst_addrs=np.concatenate([p[1] for p in parts]).astype(np.int64),
        lengths=np.concatenate([p[2] for p in parts]).astype(np.int64),
        pool_ids=np.concatenate(pool_ids),
    )


def span_slot_ids(pages: np.ndarray, span: PageSpan) -> np.ndarray:
    """Slots of the span's positions in order: page i's slots, truncated to num_tokens.

    Example, page 4, pages [7, 2], span [8, 14): slots 28..31 then 8, 9.
    """
    pages = host_int64(pages)
    if pages.size != span.num_pages:
        raise DescriptorError(f"span has {span.num_pages} pages, got {pages.size}")
    p = span.page_size
    return (pages[:, None] * p + np.arange(p, dtype=np.int64)).reshape(-1)[: span.num_tokens]


def staged_nbytes(regions: KVRegions, plan: TransferPlan) -> tuple[int, int]:
    """(full, SWA) bytes of one request packed contiguously: every full tensor's span
    tokens, tensor after tensor in region order, then every SWA tensor's."""
    return (plan.full.num_tokens * regions.bytes_per_token("full"),
            plan.swa.num_tokens * regions.bytes_per_token("swa"))


def staged_descriptors(
    src_addr: int, dst_addr: int, nbytes_by_pool: tuple[int, int], chunk_bytes: int
) -> TransferDescriptors:
    """Descriptors moving a packed request (full bytes, then SWA bytes) between two
    staging buffers, in chunks of at most `chunk_bytes`; no chunk spans both pools."""
    if chunk_bytes < 1:
        raise DescriptorError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    srcs, dsts, lens, pools = [], [], [], []
    offset = 0
    for pool_id, nbytes in enumerate(nbytes_by_pool):
        for lo in range(0, nbytes, chunk_bytes):
            srcs.append(src_addr + offset + lo)
            dsts.append(dst_addr + offset + lo)
            lens.append(min(chunk_bytes, nbytes - lo))
            pools.append(pool_id)
        offset += nbytes
    as_array = lambda xs: np.asarray(xs, dtype=np.int64)  # noqa: E731
    return TransferDescriptors(as_array(srcs), as_array(dsts), as_array(lens), as_array(pools))
