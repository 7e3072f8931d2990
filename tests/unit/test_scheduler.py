"""Scheduler unit tests with exact expectations, no model: a driver plays the engine's
part (mark KV computed, commit filled pages, append one token per sampling item).

Shortfall ladder: frontier advance, then SWA eviction, then full eviction, then
retraction, in that order and each only as far as needed; the victim is the request
with the least progress; admission needs both budgets; a request that cannot fit
alone is dropped (length at pool capacity, else an error), never raised.
Numbers use page P = 4, window W = 8, so max_frontier(L) = floor4(floor4(L) - 7).
"""

from __future__ import annotations

import pytest

from swakv.cache import ChunkCache, PrefixCache
from swakv.memory import Need, ReqTable, SWAAllocator
from swakv.memory.pages import page_floor
from swakv.sampling_params import SamplingParams
from swakv.sched.cost import CostModel
from swakv.sched.request import FinishReason, Lifecycle, Request
from swakv.sched.scheduler import Scheduler

P, W = 4, 8


class SpyMixin:
    """Records the ladder's facade calls: ('frontier', target), ('evict', Need)."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.log: list[tuple] = []

    def advance_frontier(self, req, new_frontier):
        freed = super().advance_frontier(req, new_frontier)
        if freed:
            self.log.append(("frontier", freed))
        return freed

    def evict(self, need):
        freed = super().evict(need)
        self.log.append(("evict", need, freed))
        return freed


class SpyPrefix(SpyMixin, PrefixCache):
    pass


class SpyChunk(SpyMixin, ChunkCache):
    pass


class Driver:
    """Scheduler + facade + allocator; `step()` does what EngineCore.step does around
    the model (no forward): KV counts as computed, each sampling item appends token 0."""

    def __init__(self, full_pages: int, swa_pages: int, prefix: bool = True, chunk: int = 16,
                 reserve: int = 4, stride: int = 4, max_running: int = 8) -> None:
        self.alloc = SWAAllocator(full_pages, swa_pages, P)
        self.table = ReqTable(max_running, 512)
        cls = SpyPrefix if prefix else SpyChunk
        self.cache = cls(self.alloc, self.table, P, W)
        self.cost = CostModel(W, P, chunk, reserve, stride)
        self.sched = Scheduler(self.cost, self.cache, max_running)
        self.prefix = prefix
        self.dropped = []

    def add(self, prompt: list[int], max_tokens: int) -> Request:
        req = Request(list(prompt), SamplingParams(max_tokens=max_tokens), max_context=512)
        self.sched.add(req)
        return req

    def step(self):
        out = self.sched.schedule()
        self.dropped += out.dropped
        for d in out.dropped:
            d.req.lifecycle, d.req.finish_reason = Lifecycle.FINISHED, d.reason
        for item in out.items:
            kv = item.req.kv
            self.cache.mark_computed(kv, item.prefix_len + item.num_tokens)
            if self.prefix and (not item.completes or page_floor(kv.kv_len, P) > kv.protected_len):
                self.cache.cache_unfinished(kv)
        for item in out.items:
            if not item.completes:
                continue
            req = item.req
            req.token_ids.append(0)
            if req.max_new_tokens == 0:
                self.sched.finish(req)
                req.lifecycle, req.finish_reason = Lifecycle.FINISHED, FinishReason.LENGTH
        self.check()
        return out

    def run(self, reqs: list[Request], max_steps: int = 500) -> None:
        for _ in range(max_steps):
            if all(r.is_finished for r in reqs):
                return
            self.step()
        raise AssertionError("no progress")

    def check(self) -> None:
        self.cache.check_integrity(self.sched.live_kvs())

    def close(self, *outside) -> None:
        """End of a test: release `outside` (KV a test took around the scheduler), finish
        every request (its KV cached), evict everything; the pools and the request rows
        must be back at their initial free counts."""
        for kv in outside:
            self.cache.release(kv)
        for req in list(self.sched.running) + list(self.sched.waiting):
            self.sched.finish(req)
        self.check()
        self.cache.evict(self.alloc.total())
        self.check()
        assert self.alloc.available() == self.alloc.total(), "pools not back at baseline"
        assert self.table.num_free == self.table.num_rows, "request rows leaked"


def tokens(n: int, base: int) -> list[int]:
    return [base + i for i in range(n)]


# ------------------------------------------------------------------------ admission
# A (prompt 8, max 8) decodes; at B's admission in the same step A holds rows
# [0, 9): held(A) = Need(12, 8) (SWA from max(0, 8 - 7) = 1), need(A) = Need(16, 16)
# (full page_ceil(9 + min(7, 4)), SWA swa_steady = page_ceil(8 + 4 + 4)), so
# outstanding(A) = Need(4, 8). B (prompt 8, max 8) needs Need(12, 12). Free after A's
# decode page: (4F - 12, 4S - 12); budget = (4F - 16, 4S - 20): B fits iff F >= 7, S >= 8.
@pytest.mark.parametrize("full_pages, swa_pages, admitted", [
    (7, 8, True), (6, 8, False), (7, 7, False), (6, 7, False)])
def test_admission_needs_both_budgets(full_pages, swa_pages, admitted):
    d = Driver(full_pages, swa_pages)
    a = d.add(tokens(8, 100), 8)
    d.step()  # A prefills 8 tokens and samples
    assert a.lifecycle is Lifecycle.RUNNING and len(a.token_ids) == 9
    b = d.add(tokens(8, 200), 8)
    d.step()
    # the budget the scheduler saw, recomputed independently
    assert d.cost.outstanding(a) == Need(4, 8)
    assert (b.lifecycle is Lifecycle.RUNNING) == admitted
    if not admitted:
        assert b.kv is None and list(d.sched.waiting) == [b]
        assert d.table.num_free == 7, "a refused admission kept its row"
        assert d.alloc.available() == Need(4 * full_pages - 12, 4 * swa_pages - 12)
    d.run([a, b])
    assert d.cache.log == [] or all(e[0] != "retract" for e in d.cache.log)
    d.close()


def test_first_request_admitted_even_if_budget_is_short():
    # With nothing running the budget check is skipped: the lone request always runs.
    d = Driver(4, 4)
    a = d.add(tokens(8, 100), 100)  # need Need(12, 12) but max_tokens 100 > room
    d.step()
    assert a.lifecycle is Lifecycle.RUNNING
    d.close()


# ---------------------------------------------------------------------------- ladder
def decode_until_short(d: Driver, req: Request, pool: str) -> None:
    """Step until the next decode starts a page the free `pool` cannot hold."""
    for _ in range(200):
        kv = req.kv
        if kv.kv_len % P == 0 and getattr(d.alloc.available(), pool) == 0 and not req.is_prefilling:
            return
        d.step()
    raise AssertionError("never short")


def test_ladder_frontier_first_and_only_as_far_as_needed():
    # ChunkCache (no tree): rung 1 frees the request's own SWA below max_frontier.
    # 6 SWA pages: A (prompt 12) fills them at kv_len 24; its next page needs 1 more.
    d = Driver(64, 6, prefix=False, stride=64)
    a = d.add(tokens(12, 100), 40)
    d.step()
    decode_until_short(d, a, "swa")
    assert a.kv.kv_len == 24 and a.kv.frontier == 0 and d.cache.log == []
    d.step()
    # max_frontier(24) = floor4(24 - 7) = 16: SWA of [0, 16) freed, nothing evicted
    assert d.cache.log == [("frontier", 16)]
    assert a.kv.frontier == 16 and d.sched.counters.num_retractions == 0
    assert d.alloc.available() == Need(4 * 64 - 28, 4 * 6 - 12)
    d.close()


def test_ladder_evicts_swa_before_full_and_no_full_for_swa():
    # X (16 tokens) is cached and unlocked: Need(16, 16) evictable. A then fills the SWA
    # pool; its next page is short of SWA only: rung 2 evicts exactly one page of SWA
    # (X's node is tombstoned, its full pages stay) and no full KV is evicted.
    d = Driver(64, 8)
    x = d.add(tokens(16, 500), 1)
    d.run([x])
    assert d.cache.evictable() == Need(16, 16)
    a = d.add(tokens(12, 100), 40)
    d.step()
    decode_until_short(d, a, "swa")
    full_free = d.alloc.available().full
    d.cache.log.clear()
    d.step()
    assert [e[:2] for e in d.cache.log] == [("evict", Need(0, 4))], d.cache.log
    assert d.cache.log[0][2].full == 0, "full KV evicted for an SWA shortfall"
    assert d.cache.log[0][2].swa >= 4
    assert d.alloc.available().full == full_free - 4  # only A's new page
    assert d.cache.match(tokens(16, 500) + [1]).full_only_len == 16  # X's full KV kept
    assert d.sched.counters.num_retractions == 0
    d.close()


def test_ladder_full_eviction_only_as_far_as_needed():
    # Full short, SWA ample: one 1-page leaf is evicted (the oldest), the other stays.
    d = Driver(10, 32)
    x1, x2 = d.add(tokens(4, 500), 1), d.add(tokens(4, 600), 1)
    d.run([x1, x2])
    assert d.cache.evictable() == Need(8, 8)
    a = d.add(tokens(12, 100), 60)
    d.step()
    decode_until_short(d, a, "full")
    d.cache.log.clear()
    d.step()
    assert [e[:2] for e in d.cache.log] == [("evict", Need(4, 0))]
    assert d.cache.log[0][2] == Need(4, 4)  # a full leaf goes with its SWA
    assert d.cache.match(tokens(4, 500) + [1]).prefix_len == 0  # x1: oldest, evicted
    assert d.cache.match(tokens(4, 600) + [1]).prefix_len == 4  # x2 stays
    assert d.sched.counters.num_retractions == 0
    d.close()


def test_retraction_victim_is_least_progress():
    # Three decoding requests, nothing evictable, pools exactly full: the next decode
    # retracts the one with the fewest outputs (ties: fewest computed, then newest).
    d = Driver(16, 16, prefix=False, reserve=1, stride=64)
    a = d.add(tokens(8, 100), 50)
    d.step()
    d.step()  # A has 2 outputs
    b = d.add(tokens(4, 200), 50)
    c = d.add(tokens(7, 300), 50)
    d.step()  # B and C prefill and sample their first token
    while d.alloc.available().full > 0:
        d.step()
    kvs = {r.request_id: (r.num_output_tokens, r.num_computed_tokens) for r in (a, b, c)}
    least = min((b, c, a), key=lambda r: kvs[r.request_id])
    while True:
        if any(r.kv.kv_len % P == 0 for r in (a, b, c)):
            break
        d.step()
        least = min((c, b, a), key=lambda r: (r.num_output_tokens, r.num_computed_tokens))
    d.step()
    assert d.sched.counters.num_retractions == 1
    assert least.lifecycle is Lifecycle.RETRACTED and least.kv is None
    assert list(d.sched.waiting) == [least]
    others = [r for r in (a, b, c) if r is not least]
    assert all(r.lifecycle is Lifecycle.RUNNING for r in others)
    d.run([a, b, c])
    assert all(len(r.output_ids) == 50 for r in (a, b, c)), "a retraction lost outputs"
    d.close()


def test_retractions_run_in_a_loop_not_recursion():
    # Nothing fits: 6 running requests each hold 1 page (4 of 12 prompt tokens) and
    # need 2 more for their next chunk; the rest of the pool is held outside the
    # scheduler. One retraction frees 1 page (not enough), the second makes a chunk fit.
    # The old `return self.schedule()` recursed once per retraction: each retraction
    # ran one frame deeper. Now they run at the same depth.
    import inspect

    d = Driver(32, 32, prefix=False, chunk=8, stride=64)
    reqs = [d.add(tokens(12, 100 * (i + 1)), 2) for i in range(6)]
    for req in reqs:  # admit each with a 4-token first chunk, as a tighter budget would
        item = d.sched._admit(req, 4)
        d.cache.mark_computed(req.kv, item.num_tokens)
    hog = d.cache.admit(tokens(8, 900), d.cache.match([]))
    d.cache.extend(hog, d.alloc.available().full)  # the rest of both pools
    assert d.alloc.available() == Need(0, 0)
    depths = []
    real = d.sched._retract
    d.sched._retract = lambda r: (depths.append(len(inspect.stack())), real(r))[1]
    out = d.sched.schedule()
    d.cache.check_integrity(d.sched.live_kvs() + [hog])
    assert len(depths) == 2 and depths[0] == depths[1], depths
    assert [i.num_tokens for i in out.items] == [8]
    assert d.sched.counters.num_retractions == 2
    d.close(hog)


# --------------------------------------------------------------- lone requests dropped
def test_lone_request_at_full_capacity_finishes_with_length():
    # Full pool 4 pages = 16 tokens: a lone decoding request reaches it and cannot take
    # the 17th position: finished with `length`, never an exception; KV freed.
    d = Driver(4, 8)
    a = d.add(tokens(8, 100), 100)
    d.run([a])
    assert [(x.req, x.reason) for x in d.dropped] == [(a, FinishReason.LENGTH)]
    assert "capacity of 16 tokens" in d.dropped[0].message
    assert len(a.token_ids) == 17 and a.kv is None and not d.sched.running
    d.cache.evict(d.alloc.total())
    assert d.alloc.available() == d.alloc.total() and d.table.num_free == 8
    d.close()


def test_lone_request_that_can_never_run_is_dropped_with_an_error():
    # SWA pool of 2 pages cannot hold a 16-token chunk (4 pages): the head of the queue
    # is dropped with an error, the next request runs.
    d = Driver(64, 2, chunk=16)
    bad = d.add(tokens(20, 100), 4)
    good = d.add(tokens(3, 300), 2)
    out = d.step()
    assert [(x.req, x.reason) for x in out.dropped] == [(bad, FinishReason.ERROR)]
    assert "cannot be scheduled" in out.dropped[0].message
    assert bad.kv is None and bad not in d.sched.waiting
    assert [i.req for i in out.items] == [good]
    d.run([good])
    assert d.table.num_free == 8
    d.close()


def test_a_step_with_work_never_returns_nothing():
    # Whatever the pools, schedule() returns items or drops something while work waits.
    for full_pages, swa_pages in [(2, 2), (3, 1), (4, 3), (8, 2)]:
        d = Driver(full_pages, swa_pages, chunk=8)
        reqs = [d.add(tokens(n, 100 * (n + 1)), 6) for n in (3, 9, 14, 5)]
        for _ in range(300):
            if not (d.sched.running or d.sched.waiting):
                break
            out = d.step()
            assert out.items or out.dropped, (full_pages, swa_pages)
        assert all(r.is_finished for r in reqs)
        d.cache.evict(d.alloc.total())
        assert d.alloc.available() == d.alloc.total()
        d.close()


# ------------------------------------------------------------------- findings 8 and 12
class Recorder:
    """Proxy that records which attributes of the facade the scheduler touches."""

    def __init__(self, target) -> None:
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "names", set())

    def __getattr__(self, name):
        self.names.add(name)
        return getattr(self._target, name)


@pytest.mark.parametrize("prefix", [True, False])
def test_f08_scheduler_reaches_kv_only_through_the_facade(prefix):
    from swakv.cache import KVCache

    d = Driver(24, 12, prefix=prefix, chunk=8, max_running=4)
    assert isinstance(d.cache, KVCache)
    rec = Recorder(d.cache)
    d.sched.cache = rec
    reqs = [d.add(tokens(n, 7) if i % 2 else tokens(n, 50 + i), 10)
            for i, n in enumerate((3, 17, 30, 9, 25, 12))]
    d.run(reqs)
    protocol = {n for n in dir(KVCache) if not n.startswith("_")}
    assert rec.names <= protocol, rec.names - protocol
    assert {"extend", "decode", "admit", "can_allocate"} <= rec.names
    sched_vars = vars(d.sched)
    assert not any(k in sched_vars for k in ("allocator", "req_table")), sched_vars.keys()
    d.close()


def test_f12_prefix_hits_counted_once_per_admission():
    # B shares X's 8 cached tokens but waits behind A's budget: each refused
    # attempt matches and admits tentatively, then rolls back. Before, the facade counted
    # each attempt; now only the admission that goes ahead counts.
    d = Driver(9, 8, reserve=16)
    x = d.add(tokens(8, 500), 1)
    d.run([x])
    a = d.add(tokens(8, 100), 12)
    d.step()
    attempts = [0]
    real = d.cache.admit

    def admit(token_ids, match):
        attempts[0] += 1
        return real(token_ids, match)

    d.cache.admit = admit
    b = d.add(tokens(8, 500) + [1, 2, 3, 4], 2)
    d.run([a, b])
    assert attempts[0] >= 2, attempts  # refused at least once before it ran
    assert b.cached_prompt_tokens == 8
    hits_before_b = d.sched.counters.prefix_hit_tokens - 8
    assert hits_before_b == 0  # X and A hit nothing
    assert d.sched.counters.prefix_lookup_tokens == 8 + 8 + 12  # once per admission
    d.close()
