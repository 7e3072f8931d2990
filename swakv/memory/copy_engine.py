"""Batched page copies between the device KV pools and the host KV pools.

A `CopyBatch` names a direction (BACKUP: device -> host, LOAD: host -> device) and, per
pool, page `src_pages[i]` of the source pool to copy to page `dst_pages[i]` of the
destination pool. Each page carries `page_size` slots of every layer of its pool (K and
V). Pairs are merged into runs contiguous on both sides; a pool with one run is copied
with one `narrow().copy_()` per layer tensor, otherwise with one gather / transfer /
scatter (index_select, copy, index_copy_) per layer tensor, indexed by page over the
`[num_pages + 1, page_size, heads, head_dim]` view (a page's slots are contiguous), so each
index moves a whole page.

Completion: `submit` returns a `CopyHandle`. When both sides are on one device (CPU), or
the device is not CUDA, the copy runs synchronously and the handle is done at once. With
CUDA device pools the copies run on a side stream (ordered after the work already queued
on the submitting stream) with non_blocking copies from/to pinned host memory; the CUDA
path has not been run on a GPU yet. Contract for the caller, CUDA or not:
- source pages stay allocated and unwritten until the handle is done;
- a LOAD's destination pages are read only after `wait()`, or by work queued on a stream
  after `wait_stream()`; a BACKUP's host pages hold the bytes once `done()` is True or
  `wait()` returned (the host-side scatter runs then, in submission order).
A LOAD reading host pages that an unfinished BACKUP writes waits for that backup first.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
import torch

from swakv.memory.allocator.base import as_numpy
from swakv.memory.host_pool import HostKVPool
from swakv.memory.kv_pool import KVPool


class CopyDirection(StrEnum):
    BACKUP = "backup"  # device pool -> host pool
    LOAD = "load"  # host pool -> device pool


class InvalidCopy(ValueError):
    """A copy batch with unequal page lists, page 0, out-of-range or repeated destinations."""


class PoolMismatch(ValueError):
    """The host pools do not mirror the device pools (layers, shapes, dtype, page size)."""


def _page_ids(pages) -> torch.Tensor:
    """Page ids as a 1-D int64 CPU tensor (bookkeeping stays on the host)."""
    if isinstance(pages, torch.Tensor):
        pages = pages.cpu()
    return torch.as_tensor(as_numpy(pages), dtype=torch.int64).reshape(-1)


@dataclass(frozen=True)
class PageCopy:
    """Copy page `src_pages[i]` of the source pool to page `dst_pages[i]` of the destination.

    Accepts tensors, arrays or lists; stored as int64 CPU tensors.
    """

    src_pages: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    dst_pages: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))

    def __post_init__(self) -> None:
        object.__setattr__(self, "src_pages", _page_ids(self.src_pages))
        object.__setattr__(self, "dst_pages", _page_ids(self.dst_pages))

    @property
    def num_pages(self) -> int:
        return int(self.src_pages.numel())


@dataclass(frozen=True)
class CopyBatch:
    """One batch: for BACKUP src pages are device pages and dst pages host pages; LOAD the
    reverse. Example: back up device full pages [7, 8, 9] into host pages [1, 2, 3] and
    device SWA page 4 into host SWA page 1:
    `CopyBatch(CopyDirection.BACKUP, full=PageCopy([7, 8, 9], [1, 2, 3]), swa=PageCopy([4], [1]))`.
    """

    direction: CopyDirection
    full: PageCopy = field(default_factory=PageCopy)
    swa: PageCopy = field(default_factory=PageCopy)


@dataclass
class CopyCounters:
    """Bytes (K+V, all layers of the pool) and batches submitted; every submitted copy runs."""

    backup_full_bytes: int = 0
    backup_swa_bytes: int = 0
    load_full_bytes: int = 0
    load_swa_bytes: int = 0
    num_backup_batches: int = 0
    num_load_batches: int = 0

    def bytes_copied(self, direction: CopyDirection, pool: str) -> int:
        return getattr(self, f"{direction.value}_{pool}_bytes")


def merge_runs(src_pages: np.ndarray, dst_pages: np.ndarray) -> np.ndarray:
    """[num_runs, 3] int64 rows (src_start, dst_start, num_pages): maximal runs where both
    lists step by +1. Example: src [3, 4, 5, 9], dst [1, 2, 7, 8] -> [[3, 1, 2], [5, 7, 1],
    [9, 8, 1]]."""
    n = src_pages.size
    if n == 0:
        return np.zeros((0, 3), dtype=np.int64)
    breaks = np.flatnonzero((np.diff(src_pages) != 1) | (np.diff(dst_pages) != 1)) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [n]))
    return np.stack((src_pages[starts], dst_pages[starts], ends - starts), axis=1).astype(np.int64)


@dataclass(frozen=True)
class _PoolPlan:
    """One pool's part of a batch: page `src_pages[j]` -> page `dst_pages[j]`."""

    runs: np.ndarray  # [num_runs, 3] in pages, see merge_runs
    src_pages: torch.Tensor  # int64 CPU [num_pages], each in [1, num_src_pages]
    dst_pages: torch.Tensor  # distinct, each in [1, num_dst_pages]


def validate_copy(copy: PageCopy, num_src_pages: int, num_dst_pages: int,
                  pool: str) -> tuple[np.ndarray, np.ndarray]:
    """(src, dst) page ids of `copy` as numpy, after the checks every copier makes:
    equal lengths, ids in `[1, num_*_pages]` of their pool, destinations distinct."""
    src, dst = copy.src_pages.numpy(), copy.dst_pages.numpy()
    if src.size != dst.size:
        raise InvalidCopy(f"{pool}: {src.size} source pages but {dst.size} destination pages")
    for name, pages, hi in (("source", src, num_src_pages), ("destination", dst, num_dst_pages)):
        if pages.size and (int(pages.min()) < 1 or int(pages.max()) > hi):
            raise InvalidCopy(f"{pool}: {name} page ids must lie in [1, {hi}]: {pages[:8].tolist()}")
    if np.unique(dst).size != dst.size:
        raise InvalidCopy(f"{pool}: destination pages repeated: {dst[:8].tolist()}")
    return src, dst


def count_copy(counters: CopyCounters, batch: CopyBatch, page_size: int,
               slot_bytes: dict[str, int]) -> None:
    """Add `batch`'s bytes per pool (`slot_bytes[pool]` bytes per token) and one batch."""
    d = batch.direction.value
    for pool, copy in (("full", batch.full), ("swa", batch.swa)):
        n = copy.num_pages * page_size * slot_bytes[pool]
        setattr(counters, f"{d}_{pool}_bytes", getattr(counters, f"{d}_{pool}_bytes") + n)
    setattr(counters, f"num_{d}_batches", getattr(counters, f"num_{d}_batches") + 1)


def _plan(copy: PageCopy, num_src_pages: int, num_dst_pages: int, pool: str) -> _PoolPlan:
    src, dst = validate_copy(copy, num_src_pages, num_dst_pages, pool)
    return _PoolPlan(merge_runs(src, dst), copy.src_pages, copy.dst_pages)


def _page_rows(t: torch.Tensor, page_size: int) -> torch.Tensor:
    """`[num_pages + 1, page_bytes // w]` view of a contiguous pool tensor in the widest
    integer dtype (w bytes) dividing a page's bytes and the tensor's byte offset: copies
    move bits exactly, and CPU index_copy_ (element-wise) moves fewer, wider elements."""
    elem = t.element_size()
    page_bytes = page_size * t[0].numel() * elem
    for dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
        w = dtype.itemsize
        if page_bytes % w == 0 and t.storage_offset() * elem % w == 0 and elem <= w:
            return t.reshape(-1, page_size * t[0].numel()).view(dtype)
    return t.reshape(-1, page_size * t[0].numel())  # elements wider than the page allows


def _copy_tensor(src: torch.Tensor, dst: torch.Tensor, plan: _PoolPlan, page_size: int,
                 src_idx: torch.Tensor, dst_idx: torch.Tensor, non_blocking: bool,
                 keep: list) -> Callable[[], None] | None:
    """Queue the copy of one layer tensor; return a host-side step to run once it is complete.

    `src_idx` / `dst_idx` are `plan`'s page ids on `src.device` / `dst.device`.
    """
    if len(plan.runs) == 1:
        s0, d0, n = (int(x) * page_size for x in plan.runs[0])
        dst.narrow(0, d0, n).copy_(src.narrow(0, s0, n), non_blocking=non_blocking)
        return None
    src, dst = _page_rows(src, page_size), _page_rows(dst, page_size)
    if src.device == dst.device:
        dst.index_copy_(0, dst_idx, src.index_select(0, src_idx))
        return None
    staged = torch.empty((src_idx.numel(), *src.shape[1:]), dtype=src.dtype,
                         pin_memory=non_blocking)
    keep.append(staged)
    if src.device.type == "cpu":  # host -> device: gather on the host, one transfer, scatter there
        torch.index_select(src, 0, src_idx, out=staged)
        dst.index_copy_(0, dst_idx, staged.to(dst.device, non_blocking=non_blocking))
        return None
    # device -> host: gather on the device, one transfer; the host scatter waits for it
    staged.copy_(src.index_select(0, src_idx), non_blocking=non_blocking)
    return lambda: dst.index_copy_(0, dst_idx, staged)


class CopyHandle:
    """Completion of one submitted batch; see the module docstring for what it guarantees."""

    def __init__(self, engine: CopyEngine | None, event, finish_steps: list, keep: list,
                 host_pages: dict[str, np.ndarray], direction: CopyDirection) -> None:
        self._engine = engine
        self._event = event  # torch.cuda.Event, or None when complete at submit
        self._finish_steps = finish_steps
        self._keep = keep  # staging tensors alive until the copies are complete
        self.host_pages = host_pages  # pool -> host page ids this batch reads or writes
        self.direction = direction
        self._finished = event is None

    def _finish(self) -> None:
        for step in self._finish_steps:
            step()
        self._finish_steps, self._keep, self._finished = [], [], True

    def done(self) -> bool:
        """True once the batch's bytes are in place (never blocks)."""
        if not self._finished:
            self._engine._advance()
        return self._finished

    def wait(self) -> None:
        """Block until the batch's bytes are in place."""
        if not self._finished:
            self._event.synchronize()
            self._engine._advance()

    def wait_stream(self, stream=None) -> None:
        """Order `stream` (default: the current CUDA stream) after this batch's device work,
        without blocking the host: enough before a forward pass reads LOADed pages. No-op
        when complete."""
        if not self._finished:
            (stream or torch.cuda.current_stream(self._engine.device)).wait_event(self._event)


class CopyEngine:
    """Copies pages between `device_pool` (a KVPool) and `host_pool` (a HostKVPool)."""

    def __init__(self, device_pool: KVPool, host_pool: HostKVPool) -> None:
        self.page_size = host_pool.page_size
        if device_pool.allocator.page_size != self.page_size:
            raise PoolMismatch(f"page sizes differ: device {device_pool.allocator.page_size}, "
                               f"host {self.page_size}")
        # pool -> (device tensors, host tensors), K tensors then V tensors, layer by layer
        self._tensors = {
            "full": (device_pool.full_k + device_pool.full_v, host_pool.full_k + host_pool.full_v),
            "swa": (device_pool.swa_k + device_pool.swa_v, host_pool.swa_k + host_pool.swa_v),
        }
        for pool, (dev, host) in self._tensors.items():
            if [(t.shape[1:], t.dtype) for t in dev] != [(t.shape[1:], t.dtype) for t in host]:
                raise PoolMismatch(f"{pool} host pool does not mirror the device pool's layers")
        p = self.page_size
        self._num_pages = {  # pool -> (device pages, host pages), page 0 excluded
            "full": (device_pool.allocator.num_full_slots // p - 1, host_pool.num_full_pages),
            "swa": (device_pool.allocator.num_swa_slots // p - 1, host_pool.num_swa_pages),
        }
        # bytes one slot of the pool costs across its layers' K and V
        self._slot_bytes = {pool: sum(t[0].numel() * t.element_size() for t in dev)
                            for pool, (dev, _) in self._tensors.items()}
        all_device = self._tensors["full"][0] + self._tensors["swa"][0]
        self.device = all_device[0].device if all_device else device_pool.device
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._in_flight: deque[CopyHandle] = deque()  # submission order
        self.counters = CopyCounters()

    def submit(self, batch: CopyBatch) -> CopyHandle:
        """Validate the whole batch (InvalidCopy, nothing queued), then queue its copies."""
        if not isinstance(batch.direction, CopyDirection):
            raise InvalidCopy(f"direction must be a CopyDirection, got {batch.direction!r}")
        self._advance()  # finish what completed, so staging buffers do not pile up
        backup = batch.direction is CopyDirection.BACKUP
        plans = {}
        for pool, copy in (("full", batch.full), ("swa", batch.swa)):
            num_device, num_host = self._num_pages[pool]
            src_n, dst_n = (num_device, num_host) if backup else (num_host, num_device)
            plans[pool] = _plan(copy, src_n, dst_n, pool)
        host_pages = {pool: (c.dst_pages if backup else c.src_pages).numpy()
                      for pool, c in (("full", batch.full), ("swa", batch.swa))}
        if not backup:
            self._wait_for_backups_writing(host_pages)
        self._count(batch)
        if self._stream is None:
            for step in self._issue(backup, plans, non_blocking=False, keep=[]):
                step()
            return CopyHandle(None, None, [], [], host_pages, batch.direction)
        submitting = torch.cuda.current_stream(self.device)
        keep: list = []
        with torch.cuda.stream(self._stream):
            self._stream.wait_stream(submitting)  # device KV written so far is visible
            steps = self._issue(backup, plans, non_blocking=True, keep=keep)
            event = torch.cuda.Event()
            event.record(self._stream)
        handle = CopyHandle(self, event, steps, keep, host_pages, batch.direction)
        self._in_flight.append(handle)
        return handle

    def _issue(self, backup: bool, plans: dict[str, _PoolPlan], non_blocking: bool,
               keep: list) -> list[Callable[[], None]]:
        steps = []
        for pool, plan in plans.items():
            if plan.src_pages.numel() == 0:
                continue
            dev, host = self._tensors[pool]
            srcs, dsts = (dev, host) if backup else (host, dev)
            src_idx = plan.src_pages.to(srcs[0].device, non_blocking=non_blocking)
            dst_idx = plan.dst_pages.to(dsts[0].device, non_blocking=non_blocking)
            for src, dst in zip(srcs, dsts):
                step = _copy_tensor(src, dst, plan, self.page_size, src_idx, dst_idx,
                                    non_blocking, keep)
                if step is not None:
                    steps.append(step)
        return steps

    def _count(self, batch: CopyBatch) -> None:
        count_copy(self.counters, batch, self.page_size, self._slot_bytes)

    def _advance(self) -> None:
        """Finish in-flight batches whose device work is complete, oldest first (one stream,
        so a complete batch implies every earlier one is complete)."""
        while self._in_flight and self._in_flight[0]._event.query():
            self._in_flight.popleft()._finish()

    def _wait_for_backups_writing(self, host_pages: dict[str, np.ndarray]) -> None:
        """Before a LOAD reads `host_pages`, finish the last unfinished BACKUP writing any."""
        self._advance()
        for handle in reversed(self._in_flight):
            if handle.direction is CopyDirection.BACKUP and any(
                    np.isin(host_pages[pool], handle.host_pages[pool]).any() for pool in host_pages):
                handle.wait()
                return

    def num_in_flight(self) -> int:
        self._advance()
        return len(self._in_flight)

    def wait_all(self) -> None:
        """Block until every submitted batch is complete (for shutdown and tests)."""
        if self._in_flight:
            self._in_flight[-1].wait()
