"""The host KV tier without tensors: the same page bookkeeping, copies only counted.

`HostPageLedger` is a `HostKVPool` whose free lists, allocation and freeing are the
real ones but which allocates no host tensors; `CountingCopier` implements the copy
engine's interface (`submit(batch) -> handle`) by validating each batch like
`CopyEngine` does and counting its bytes. With both, `HiCache` (backup, demotion, host
eviction, load-back) runs unchanged over a simulated engine.
"""

from __future__ import annotations

from swakv.cache.hicache import HiCache
from swakv.cache.tree_host import HostTier
from swakv.config import KVLayout
from swakv.memory.copy_engine import (
    CopyBatch,
    CopyCounters,
    CopyDirection,
    InvalidCopy,
    count_copy,
    validate_copy,
)
from swakv.memory.host_pool import HostKVPool, HostPoolSizes, host_pool_sizes


class HostPageLedger(HostKVPool):
    """Host pools of `sizes` pages: free lists and accounting only, no KV bytes."""

    def __init__(self, layout: KVLayout, sizes: HostPoolSizes) -> None:
        super().__init__(layout, sizes, device="cpu")

    def _make(self):
        return [], [], [], []

    def buffers(self, layer_id: int):
        raise TypeError("a host page ledger holds no KV tensors")

    def nbytes(self) -> tuple[int, int]:
        """Bytes the pools would take (what `host_pool_sizes` budgeted)."""
        return self.sizes.full_bytes, self.sizes.swa_bytes

    def check_integrity(self) -> None:
        self.full.check_integrity()
        self.swa.check_integrity()


class _Done:
    """Handle of a counted copy: complete at submission."""

    def __init__(self, direction: CopyDirection) -> None:
        self.direction = direction

    def done(self) -> bool:
        return True

    def wait(self) -> None:
        return None

    def wait_stream(self, stream=None) -> None:
        return None


class CountingCopier:
    """The copy engine's interface over no tensors: validates, counts bytes, completes.

    Page ids are checked as `CopyEngine.submit` checks them: equal source and destination
    lengths, ids in `[1, num_pages]` of their pool, destinations distinct.
    """

    def __init__(self, layout: KVLayout, num_device_pages: tuple[int, int],
                 host: HostKVPool) -> None:
        self.page_size = host.page_size
        self._num_pages = {  # pool -> (device pages, host pages), page 0 excluded
            "full": (num_device_pages[0], host.num_full_pages),
            "swa": (num_device_pages[1], host.num_swa_pages),
        }
        self._slot_bytes = {"full": layout.bytes_per_token(sliding=False),
                            "swa": layout.bytes_per_token(sliding=True)}
        self.counters = CopyCounters()

    def submit(self, batch: CopyBatch) -> _Done:
        if not isinstance(batch.direction, CopyDirection):
            raise InvalidCopy(f"direction must be a CopyDirection, got {batch.direction!r}")
        backup = batch.direction is CopyDirection.BACKUP
        for pool, copy in (("full", batch.full), ("swa", batch.swa)):
            num_device, num_host = self._num_pages[pool]
            validate_copy(copy, *((num_device, num_host) if backup else (num_host, num_device)),
                          pool)
        count_copy(self.counters, batch, self.page_size, self._slot_bytes)
        return _Done(batch.direction)

    def num_in_flight(self) -> int:
        return 0

    def wait_all(self) -> None:
        return None


def simulated_host_tier(core, host_kv_memory: str, backup_threshold: int,
                        layout: KVLayout | None = None) -> HiCache:
    """Give a fresh simulated `EngineCore` (no KV tensors, no request yet) a host tier:
    a `HiCache` over its allocator and request table with a `HostPageLedger` sized as
    `swakv serve --host-kv-memory` would size it, and a `CountingCopier`. The engine's
    scheduler then reaches KV through that cache (one cache, as in serving).
    `layout` (default: the engine's dtype) gives the bytes per token of the host pools.
    """
    from swakv.sched.sizing import kv_budget_bytes

    if core.requests or core.scheduler.running or core.scheduler.waiting:
        raise ValueError("attach the host tier before any request is added")
    layout = layout or KVLayout.from_model(core.spec, core.cfg.torch_dtype)
    sizes = host_pool_sizes(layout, core.sizes, host_kv_memory,
                            device_budget_bytes=kv_budget_bytes(core.cfg.kv_memory))
    if sizes is None:
        raise ValueError(f"host KV memory {host_kv_memory!r} turns the host tier off")
    ledger = HostPageLedger(layout, sizes)
    copier = CountingCopier(layout, (core.sizes.num_full_pages, core.sizes.num_swa_pages), ledger)
    cache = HiCache(core.allocator, core.req_table, core.cfg.page_size, core.spec.window,
                    HostTier(ledger, copier, backup_threshold))
    core.cache = cache
    core.scheduler.cache = cache
    return cache
