"""Moving one request's KV between workers: as descriptors or through staging buffers.

`KVSender` (prefill side) turns a `TransferPlan` and both sides' page lists into a
backend write; `KVReceiver` (decode side) lends staging ranges and unpacks staged
requests. Two modes (`TransferMode`):
- descriptors: one descriptor per run of pages contiguous on both sides, per tensor
  (nothing to do on the receiver);
- staging: the sender packs the request's KV into its registered staging area, a few
  large descriptors move it into the receiver's staging range (lent in
  Prealloc.staging_offset), and the receiver unpacks it into its pages when
  KVWritten.staged says so.
AUTO (the default) stages when the mean descriptor is below
STAGING_MAX_MEAN_DESCRIPTOR_BYTES: on loopback TCP every descriptor costs ~23 µs
whatever its size, so fragmented page lists go faster staged and contiguous ones as
descriptors (measurement below; bench/pd_transfer.py). Over RDMA descriptors are
nearly free: use TransferMode.DESCRIPTORS there (not measured here).

Packed layout of one request: for each full tensor in region order its span's
tokens in position order (tokens x slot bytes), then the same for each SWA tensor;
`descriptors.staged_nbytes` gives both parts' sizes.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

import torch

from swakv.disagg.descriptors import (
    DescriptorError,
    KVRegions,
    TensorRegion,
    TransferDescriptors,
    build_descriptors,
    kv_tensors,
    span_slot_ids,
    staged_descriptors,
    staged_nbytes,
)
from swakv.disagg.plan import TransferPlan
from swakv.disagg.transfer import TransferBackend, TransferError, TransferHandle

if TYPE_CHECKING:
    from swakv.memory.kv_pool import KVPool


class TransferMode(StrEnum):
    DESCRIPTORS = "descriptors"
    STAGING = "staging"
    AUTO = "auto"


# AUTO stages a request when its mean descriptor is smaller than this. Measured with
# bench/pd_transfer.py (loopback TCP, 2 shared CPU cores, one torch thread per side,
# Gemma 3 270M layout, median ms from send to the receiver's ack, descriptors vs
# staging). L = 6144 (26.7 MB), page lists in runs of k pages: k=1 (8 KiB per
# descriptor) 89.9 vs 21.7; k=2 46.4 vs 22.6; k=4 (32 KiB) 25.8 vs 22.1; k=6 (48 KiB)
# 19.0 vs 20.9; k=16 16.8 vs 24.1; k=32 13.2 vs 21.6. Real allocator states:
# contiguous pools 14.4 vs 21.7 (L=6144), 10.7 vs 17.0 (L=1024); churned pools
# (24 KiB mean) 36.7 vs 21.4 and 33.3 vs 15.2; scattered 87.8 vs 22.2 and 37.0 vs 11.4.
# Staging also costs the receiver its unpack (6 ms for L=6144 on one CPU thread).
STAGING_MAX_MEAN_DESCRIPTOR_BYTES = 40 << 10
# staged bytes per descriptor: 1, 4, 16 and 64 MiB measured within noise (21.5-24 ms)
STAGING_CHUNK_BYTES = 4 << 20
STAGING_ALIGNMENT = 4096


class StagingError(TransferError):
    """A staging range released twice or never reserved, or out of the buffer."""


class StagingArea:
    """A byte buffer on the pools' device, registered once, lent out in aligned ranges.

    Free ranges `_free` are sorted, disjoint and coalesced; `_used` maps each lent
    range's offset to its size. First fit.
    """

    def __init__(self, nbytes: int, device: torch.device | str) -> None:
        if nbytes < STAGING_ALIGNMENT:
            raise ValueError(f"staging area of {nbytes} bytes is under {STAGING_ALIGNMENT}")
        self.tensor = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self.region = TensorRegion.of(self.tensor)
        self._free: list[tuple[int, int]] = [(0, nbytes)]
        self._used: dict[int, int] = {}
        self._lock = threading.Lock()

    def reserve(self, nbytes: int) -> int | None:
        """Offset of a fresh range of nbytes (rounded up to the alignment), None if none fits."""
        size = -(-max(nbytes, 1) // STAGING_ALIGNMENT) * STAGING_ALIGNMENT
        with self._lock:
            for i, (offset, free) in enumerate(self._free):
                if free >= size:
                    self._free[i : i + 1] = [(offset + size, free - size)] if free > size else []
                    self._used[offset] = size
                    return offset
        return None

    def release(self, offset: int) -> None:
        with self._lock:
            size = self._used.pop(offset, None)
            if size is None:
                raise StagingError(f"staging offset {offset} is not reserved")
            ranges = sorted([*self._free, (offset, size)])
            merged = [ranges[0]]
            for o, s in ranges[1:]:
                last_o, last_s = merged[-1]
                if last_o + last_s == o:
                    merged[-1] = (last_o, last_s + s)
                else:
                    merged.append((o, s))
            self._free = merged

    def view(self, offset: int, nbytes: int) -> torch.Tensor:
        return self.tensor[offset : offset + nbytes]

    @property
    def num_free_bytes(self) -> int:
        with self._lock:
            return sum(s for _, s in self._free)


def _staged_segments(tensors, plan: TransferPlan, full_pages, swa_pages, buffer: torch.Tensor):
    """(tensor, slot ids on its device, view of its packed bytes in `buffer`) in packed order."""
    need = sum(span.num_tokens * t.stride(0) * t.element_size()
               for span, pool_tensors in ((plan.full, tensors[0]), (plan.swa, tensors[1]))
               for t in pool_tensors)
    if buffer.dtype != torch.uint8 or buffer.numel() < need:
        raise StagingError(f"packed request needs {need} bytes, buffer has {buffer.numel()}")
    offset = 0
    for pool_tensors, span, pages in ((tensors[0], plan.full, full_pages),
                                      (tensors[1], plan.swa, swa_pages)):
        if not span.num_tokens or not pool_tensors:
            continue
        ids = torch.as_tensor(span_slot_ids(pages, span), device=pool_tensors[0].device)
        for t in pool_tensors:
            nbytes = span.num_tokens * t.stride(0) * t.element_size()
            view = buffer[offset : offset + nbytes].view(t.dtype).view(span.num_tokens, *t.shape[1:])
            yield t, ids, view
            offset += nbytes


def pack_kv(tensors, plan: TransferPlan, full_pages, swa_pages, out: torch.Tensor) -> None:
    """Gather the plan's spans of every tensor into `out` (uint8, staged_nbytes long)."""
    for t, ids, view in _staged_segments(tensors, plan, full_pages, swa_pages, out):
        torch.index_select(t, 0, ids, out=view)
    _synchronize(out.device)


def unpack_kv(tensors, plan: TransferPlan, full_pages, swa_pages, packed: torch.Tensor) -> None:
    """Scatter `packed` (as pack_kv wrote it) into the plan's spans of every tensor."""
    for t, ids, view in _staged_segments(tensors, plan, full_pages, swa_pages, packed):
        t.index_copy_(0, ids, view)
    _synchronize(packed.device)


def _synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        getattr(torch, device.type).synchronize(device)


# ---- sender and receiver ------------------------------------------------------------


@dataclass(frozen=True)
class RemoteKV:
    """What a sender knows of one receiver (from its Bootstrap): backend peer name,
    KV regions, and its staging buffer (None: it takes descriptors only)."""

    peer: str
    regions: KVRegions
    staging: TensorRegion | None = None


@dataclass(frozen=True)
class KVSend:
    handle: TransferHandle
    staged: bool  # the receiver must unpack its staging range (KVWritten.staged)


def _register_kv(backend: TransferBackend, pool: KVPool, staging: StagingArea | None) -> str:
    full, swa = kv_tensors(pool)
    return backend.register([*full, *swa, *([staging.tensor] if staging is not None else [])])


class KVSender:
    """The prefill side: moves one request's planned spans into a receiver's pages.

    Registers the pool's tensors (and the staging area) with the backend;
    `peer_info` is what the backend returned.
    """

    def __init__(self, backend: TransferBackend, pool: KVPool, staging: StagingArea | None = None,
                 mode: TransferMode = TransferMode.AUTO,
                 staging_chunk_bytes: int = STAGING_CHUNK_BYTES) -> None:
        self.backend, self.staging, self.mode = backend, staging, TransferMode(mode)
        self.staging_chunk_bytes = staging_chunk_bytes
        if self.mode is TransferMode.STAGING and staging is None:
            raise ValueError("staging mode needs a staging area")
        self.tensors = kv_tensors(pool)
        self.regions = KVRegions.of(pool)
        self.peer_info = _register_kv(backend, pool, staging)

    def send(self, remote: RemoteKV, plan: TransferPlan, src_full_pages, src_swa_pages,
             dst_full_pages, dst_swa_pages, dst_staging_offset: int | None = None) -> KVSend:
        """Start the transfer; staged when the mode says so and both sides have room.

        Page lists are in position order, one entry per page of plan.full / plan.swa.
        The pool's KV for these pages must be final (device work synchronised).
        """
        descs = build_descriptors(self.regions, remote.regions, plan, src_full_pages,
                                  dst_full_pages, src_swa_pages, dst_swa_pages)
        if self._wants_staging(descs, remote, dst_staging_offset):
            sent = self._send_staged(remote, plan, src_full_pages, src_swa_pages,
                                     dst_staging_offset)  # type: ignore[arg-type]
            if sent is not None:
                return sent
            if self.mode is TransferMode.STAGING:
                raise StagingError("staging mode, but the local staging area is full")
        return KVSend(self.backend.write(remote.peer, descs), staged=False)

    def _wants_staging(self, descs: TransferDescriptors, remote: RemoteKV,
                       dst_offset: int | None) -> bool:
        if self.mode is TransferMode.DESCRIPTORS or not len(descs):
            return False
        if self.staging is None or remote.staging is None or dst_offset is None:
            if self.mode is TransferMode.STAGING:
                raise StagingError("staging mode, but the receiver lent no staging range")
            return False
        if self.mode is TransferMode.STAGING:
            return True
        return int(descs.lengths.sum()) < STAGING_MAX_MEAN_DESCRIPTOR_BYTES * len(descs)

    def _send_staged(self, remote: RemoteKV, plan: TransferPlan, src_full_pages, src_swa_pages,
                     dst_offset: int) -> KVSend | None:
        area, dst = self.staging, remote.staging
        assert area is not None and dst is not None
        nbytes = staged_nbytes(self.regions, plan)
        total = sum(nbytes)
        if not 0 <= dst_offset <= dst.nbytes - total:
            raise DescriptorError(
                f"staging range [{dst_offset}, +{total}) outside the receiver's {dst.nbytes} bytes")
        offset = area.reserve(total)
        if offset is None:
            return None
        try:
            pack_kv(self.tensors, plan, src_full_pages, src_swa_pages, area.view(offset, total))
            descs = staged_descriptors(area.region.addr + offset, dst.addr + dst_offset, nbytes,
                                       self.staging_chunk_bytes)
            handle = self.backend.write(remote.peer, descs)
        except BaseException:
            area.release(offset)
            raise
        handle.add_done_callback(lambda _: area.release(offset))
        return KVSend(handle, staged=True)


class KVReceiver:
    """The decode side: lends staging ranges to incoming requests and unpacks them.

    Registers the pool's tensors (and the staging area) with the backend;
    `peer_info` goes into this worker's Bootstrap.
    """

    def __init__(self, backend: TransferBackend, pool: KVPool,
                 staging: StagingArea | None = None) -> None:
        self.staging = staging
        self.tensors = kv_tensors(pool)
        self.regions = KVRegions.of(pool)
        self.peer_info = _register_kv(backend, pool, staging)

    def reserve_staging(self, plan: TransferPlan) -> int | None:
        """A staging range for the request (Prealloc.staging_offset), None if none fits."""
        if self.staging is None:
            return None
        return self.staging.reserve(sum(staged_nbytes(self.regions, plan)))

    def complete(self, plan: TransferPlan, dst_full_pages, dst_swa_pages,
                 staging_offset: int | None, staged: bool) -> None:
        """After KVWritten: unpack a staged request into its pages, free its range.

        Also the abort path (staged False): frees the range only. Call it only once no
        write to this request can still be running (KVWritten, or the sender's Abort).
        """
        if staged:
            if staging_offset is None or self.staging is None:
                raise StagingError("KVWritten says staged, but no staging range was lent")
            packed = self.staging.view(staging_offset, sum(staged_nbytes(self.regions, plan)))
            unpack_kv(self.tensors, plan, dst_full_pages, dst_swa_pages, packed)
        if staging_offset is not None and self.staging is not None:
            self.staging.release(staging_offset)
