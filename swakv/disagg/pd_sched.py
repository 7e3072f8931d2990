"""Scheduler subclasses for the two PD roles: requests that hold KV outside `running`.

A PD request holds KV while no step computes it: on the prefill side between its
last prompt chunk and the end of its transfer (the backend reads its pages), on the
decode side between preallocation and the KV's arrival. Such requests live in
`held` (request id -> Request); `live_kvs()` includes them, so `check_integrity()`
accounts their rows and pages, and nothing but the PD worker frees them.

- `PrefillScheduler`: a request marked with `keep_kv_on_finish` that finishes after
  sampling its one output token (the first token, sent to the decode worker) is
  parked in `held` with its KV instead of being freed; `release_held` frees (or
  caches) it once the transfer is done.
- `DecodeScheduler`: retraction saves the request's KV in a sparse host copy
  (`KVPool.cpu_copy`: full KV for every position, SWA only where mapped) and hands
  it to `on_retract` instead of requeueing it for recomputation; `resume` puts a
  restored request back into the running batch.
"""

from __future__ import annotations

from collections.abc import Callable

from swakv.cache.protocol import KVCache
from swakv.cache.req_kv import ReqKV
from swakv.memory.kv_pool import KVCopy, KVPool
from swakv.memory.pages import Need
from swakv.sched.cost import CostModel
from swakv.sched.request import Lifecycle, Request
from swakv.sched.scheduler import Scheduler


class HeldKVScheduler(Scheduler):
    """A Scheduler that also owns requests holding KV outside the running batch."""

    def __init__(self, cost: CostModel, cache: KVCache, max_running_requests: int) -> None:
        super().__init__(cost, cache, max_running_requests)
        self.held: dict[str, Request] = {}

    def live_kvs(self) -> list[ReqKV]:
        return super().live_kvs() + [r.kv for r in self.held.values() if r.kv is not None]

    def hold(self, req: Request) -> None:
        """Take a request that holds KV (or is about to) and is neither running nor waiting."""
        if req in self.running or req in self.waiting or req.request_id in self.held:
            raise ValueError(f"request {req.request_id} is already scheduled or held")
        self.held[req.request_id] = req

    def release_held(self, req: Request, insert: bool) -> None:
        """Free a held request's KV: cache its committed prefix (`insert`) or drop it."""
        del self.held[req.request_id]
        self._drop_kv(req, insert)

    def resume(self, req: Request) -> None:
        """A held request whose KV is complete joins the running batch."""
        del self.held[req.request_id]
        req.lifecycle = Lifecycle.RUNNING
        self.running.append(req)


class PrefillScheduler(HeldKVScheduler):
    """Parks the KV of finished PD prefill requests until their transfer is done."""

    def __init__(self, cost: CostModel, cache: KVCache, max_running_requests: int) -> None:
        super().__init__(cost, cache, max_running_requests)
        self.keep_kv_on_finish: set[str] = set()

    def finish(self, req: Request, insert: bool = True) -> None:
        """A marked request that just sampled its single output token keeps its KV
        (moved to `held`); every other finish (abort, failure, drop) frees as usual."""
        rid = req.request_id
        if (rid in self.keep_kv_on_finish and req.kv is not None and req in self.running
                and req.num_output_tokens == 1):
            self.keep_kv_on_finish.discard(rid)
            self.running.remove(req)
            self.held[rid] = req
            return
        self.keep_kv_on_finish.discard(rid)
        super().finish(req, insert)


RetractHandler = Callable[[Request, KVCopy], None]


class DecodeScheduler(HeldKVScheduler):
    """Retracts into sparse host copies; `on_retract(req, copy)` queues the restore."""

    def __init__(self, cost: CostModel, cache: KVCache, max_running_requests: int,
                 kv_pool: KVPool, on_retract: RetractHandler) -> None:
        super().__init__(cost, cache, max_running_requests)
        self.kv_pool = kv_pool
        self.on_retract = on_retract
        self.num_host_copies = 0

    def make_room(self, need: Need) -> bool:
        """The shortfall ladder short of retraction (frontiers, SWA, then full eviction);
        True when `need` fits the free pools."""
        return self._make_room(need)

    def advance_to_max_frontier(self, req: Request) -> None:
        """Free the SWA of the request's own positions no query reads any more."""
        self._advance_one(req, force=True)

    def _retract(self, req: Request) -> None:
        """Copy `[0, kv_len)` to host memory (before any page is freed), then retract as
        usual (the committed prefix stays cached) and hand the request to
        `on_retract` instead of the waiting queue: it is restored, not recomputed."""
        kv = req.kv
        assert kv is not None, f"retracting {req.request_id} without KV"
        copy = self.kv_pool.cpu_copy(self.cache.req_table.read(kv.row, 0, kv.kv_len))
        super()._retract(req)
        self.waiting.remove(req)
        self.num_host_copies += 1
        self.on_retract(req, copy)


def install(core, scheduler: Scheduler) -> None:
    """Replace an idle EngineCore's scheduler (same cost model and cache)."""
    old = core.scheduler
    if old.waiting or old.running:
        raise RuntimeError("the engine's scheduler already has requests")
    if scheduler.cache is not core.cache or scheduler.cost is not core.cost:
        raise ValueError("the new scheduler must share the engine's cache and cost model")
    core.scheduler = scheduler
