"""Hypothesis state machine: many requests over a tiny vocabulary against the cache
facade, the hybrid allocator and the request table.

A fake KV pool records for every full slot and every SWA slot the (token, position)
written there (SWA through `allocator.translate`). Every match is verified by
reading back; every live request's full KV and SWA window are re-read after each
step; `check_integrity` runs after every step; at the end all pools are full again.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import HealthCheck, currently_in_test_context, event, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from swakv.cache import ChunkCache, MatchResult, PrefixCache, ReqKV  # noqa: F401
from swakv.memory import Need, OutOfKVMemory, ReqTable, SWAAllocator
from swakv.memory.pages import page_floor

# (page_size, window, use ChunkCache): windows below, at and above the page size.
CONFIGS = [
    (1, 1, False), (1, 3, False), (1, 6, False),
    (4, 3, False), (4, 4, False), (4, 9, False),
    (16, 8, False), (16, 16, False), (16, 37, False),
    (4, 6, True),
]
_rng = random.Random(7)
BASES = [tuple(_rng.randrange(2) for _ in range(12 * 16)) for _ in range(3)]
MAX_LIVE = 4
BASE_IDX = st.integers(0, 1)
CUTS = st.sampled_from([2, 5, 8, 12, 16]) | st.integers(0, 16)
TAILS = st.just([]) | st.lists(st.integers(0, 1), max_size=20)


class FakeKV:
    """(token, position) per full slot and per SWA slot; -1 = never written."""

    def __init__(self, alloc: SWAAllocator) -> None:
        self.alloc = alloc
        self.full = torch.full((alloc.num_full_slots, 2), -1, dtype=torch.long)
        self.swa = torch.full((alloc.num_swa_slots, 2), -1, dtype=torch.long)

    def write(self, slots: torch.Tensor, tokens: list[int], start: int) -> None:
        data = torch.stack((torch.tensor(tokens), torch.arange(start, start + len(tokens))), 1)
        self.full[slots] = data
        swa = self.alloc.translate(slots)
        mapped = self.alloc.is_swa_mapped(slots)
        self.swa[swa[mapped]] = data[mapped]

    def verify(self, slots: torch.Tensor, tokens: list[int], swa_from: int) -> None:
        """slots[p] holds (tokens[p], p); positions >= swa_from readable through SWA."""
        n = len(tokens)
        want = torch.stack((torch.tensor(tokens, dtype=torch.long), torch.arange(n)), 1)
        assert torch.equal(self.full[slots], want), "full KV read back wrong"
        tail = slots[swa_from:]
        assert bool(self.alloc.is_swa_mapped(tail).all()), "window not SWA-mapped"
        assert torch.equal(self.swa[self.alloc.translate(tail)], want[swa_from:]), "SWA KV wrong"


@dataclass
class Live:
    req: ReqKV
    prompt_len: int
    target_len: int


class CacheMachine(RuleBasedStateMachine):
    @initialize(cfg=st.sampled_from(CONFIGS))
    def setup(self, cfg: tuple[int, int, bool]) -> None:
        self.page, self.window, chunk = cfg
        p = self.page
        self.alloc = SWAAllocator(64, 36, p)
        self.table = ReqTable(MAX_LIVE, 16 * p)
        cls = ChunkCache if chunk else PrefixCache
        self.cache = cls(self.alloc, self.table, p, self.window)
        self.kv = FakeKV(self.alloc)
        self.live: list[Live] = []
        self.hit_tokens = self.window_miss_tokens = 0  # over admitted matches

    # ---- helpers -------------------------------------------------------------------
    def _prompt(self, base: int, cut: int, tail: list[int]) -> list[int]:
        return list(BASES[base][: cut * self.page // 2]) + tail[: 2 * self.page + 2]

    def _verify_match(self, prompt: list[int], m: MatchResult) -> None:
        p, w = self.page, self.window
        assert m.prefix_len % p == 0 and m.full_only_len % p == 0
        assert m.prefix_len <= m.full_only_len <= page_floor(len(prompt), p)
        assert int(m.full_slots.numel()) == m.prefix_len
        lo = max(0, m.prefix_len - (w - 1))
        self.kv.verify(m.full_slots, prompt[: m.prefix_len], lo)

    def _pick(self, i: int) -> Live:
        return self.live[i % len(self.live)]

    def _drop(self, item: Live, finished: bool) -> None:
        rows_before = self.table.num_free
        if finished:
            self.cache.cache_finished(item.req)
        else:
            self.cache.release(item.req)
        assert self.table.num_free == rows_before + 1 and item.req.row == -1
        self.live.remove(item)

    # ---- rules ---------------------------------------------------------------------
    @precondition(lambda self: len(self.live) < MAX_LIVE)
    @rule(base=BASE_IDX, cut=CUTS, tail=TAILS, decode=st.integers(0, 40))
    def new_request(self, base: int, cut: int, tail: list[int], decode: int) -> None:
        prompt = self._prompt(base, cut, tail)
        if not prompt:
            return
        m = self.cache.match(prompt)
        self._verify_match(prompt, m)
        assert self.cache.can_admit()
        req = self.cache.admit(list(prompt), m)
        assert req.kv_len == req.alloc_len == req.protected_len == m.prefix_len
        self.hit_tokens += m.prefix_len
        self.window_miss_tokens += m.full_only_len - m.prefix_len
        target = len(prompt) + min(decode, 3 * self.page)
        self.live.append(Live(req, len(prompt), target))

    @rule(base=BASE_IDX, cut=CUTS, tail=TAILS)
    def probe(self, base: int, cut: int, tail: list[int]) -> None:
        prompt = self._prompt(base, cut, tail)
        self._verify_match(prompt, self.cache.match(prompt))

    @precondition(lambda self: bool(self.live))
    @rule(i=st.integers(0, 99), chunk=st.integers(1, 40), tok=st.integers(0, 1))
    def extend(self, i: int, chunk: int, tok: int) -> None:
        item = self._pick(i)
        req = item.req
        if req.kv_len >= item.target_len:
            return
        if req.kv_len < item.prompt_len:
            new_len = min(item.prompt_len, req.kv_len + chunk)
        else:  # decode one token
            new_len = req.kv_len + 1
            req.token_ids.append(tok)
        start = req.kv_len
        need = self.cache.extend_need(req, new_len - start)
        if not self.cache.can_allocate(need):
            self.cache.evict((need - self.cache.available()).clamp_min(0))
        try:
            self.cache.extend(req, new_len - start)
        except OutOfKVMemory:
            assert not self.cache.can_allocate(need), "extend refused what can_allocate allowed"
            self._drop(item, finished=False)  # retract
            return
        slots = self.table.read(req.row, start, new_len)
        self.kv.write(slots, req.token_ids[start:new_len], start)
        self.cache.mark_computed(req, new_len)

    @precondition(lambda self: bool(self.live))
    @rule(i=st.integers(0, 99), tok=st.integers(0, 1), every=st.integers(1, 8),
          finish=st.booleans())
    def run_to_end(self, i: int, tok: int, every: int, finish: bool) -> None:
        """Prefill the rest, decode to the target advancing the frontier, finish."""
        item = self._pick(i)
        steps = 0
        while item in self.live and item.req.kv_len < item.target_len:
            self.extend(i, 3 * self.page, tok)
            steps += 1
            if steps % every == 0 and item in self.live:
                self.cache.advance_frontier(item.req, item.req.kv_len)
        if item in self.live and finish:
            self._drop(item, finished=True)

    @precondition(lambda self: bool(self.live))
    @rule(i=st.integers(0, 99), amount=st.integers(1, 64))
    def advance_frontier(self, i: int, amount: int) -> None:
        req = self._pick(i).req
        before = (req.frontier, self.alloc.swa_available())
        freed = self.cache.advance_frontier(req, req.frontier + amount)
        assert req.frontier >= before[0]
        assert self.alloc.swa_available() - before[1] == freed

    @precondition(lambda self: bool(self.live))
    @rule(i=st.integers(0, 99))
    def cache_unfinished(self, i: int) -> None:
        self.cache.cache_unfinished(self._pick(i).req)

    @precondition(lambda self: bool(self.live))
    @rule(i=st.integers(0, 99), finished=st.booleans())
    def finish_or_release(self, i: int, finished: bool) -> None:
        self._drop(self._pick(i), finished)

    @rule(full=st.integers(0, 48), swa=st.integers(0, 48))
    def evict(self, full: int, swa: int) -> None:
        before = self.alloc.available()
        freed = self.cache.evict(Need(full, swa))
        assert self.alloc.available() - before == freed

    # ---- invariants ----------------------------------------------------------------
    @invariant()
    def consistent(self) -> None:
        if not hasattr(self, "cache"):
            return
        self.cache.check_integrity(x.req for x in self.live)
        s = self.cache.stats()
        for name in ("revived_tokens", "dedup_tokens"):
            if getattr(s, name) and currently_in_test_context():
                event(f"{name} > 0")
        for name in ("window_miss_tokens", "hit_tokens"):
            if getattr(self, name) and currently_in_test_context():
                event(f"{name} > 0")
        for item in self.live:
            req = item.req
            slots = self.table.read(req.row, 0, req.kv_len)
            self.kv.verify(slots, req.token_ids[: req.kv_len], max(0, req.kv_len - self.window + 1))

    def teardown(self) -> None:
        if not hasattr(self, "cache"):
            return
        for item in list(self.live):
            self._drop(item, finished=True)
        self.cache.evict(Need(10**9, 10**9))
        self.cache.check_integrity([])
        assert self.alloc.available() == self.alloc.total(), "pools not full after evicting all"


CacheMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("SWAKV_CACHE_EXAMPLES", 200)),
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestCacheMachine = CacheMachine.TestCase


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_walk(cfg: tuple[int, int, bool], seed: int) -> None:
    """Long seeded programs over the same rules (hypothesis keeps programs short)."""
    rng = random.Random(seed)
    m = CacheMachine()
    m.setup(cfg)
    m.consistent()
    prompts = lambda: dict(  # noqa: E731
        base=rng.randrange(2), cut=rng.choice([2, 5, 8, 12, 16]),
        tail=[] if rng.random() < 0.5 else [rng.randrange(2) for _ in range(rng.randrange(9))],
    )
    for _ in range(150):
        r = rng.random()
        i = rng.randrange(100)
        if r < 0.2 and len(m.live) < MAX_LIVE:
            m.new_request(**prompts(), decode=rng.randrange(40))
        elif r < 0.3:
            m.probe(**prompts())
        elif not m.live or r < 0.38:
            m.evict(rng.randrange(0, 48), rng.randrange(0, 48))
        elif r < 0.6:
            m.extend(i, rng.randrange(1, 40), rng.randrange(2))
        elif r < 0.7:
            m.advance_frontier(i, rng.randrange(1, 64))
        elif r < 0.8:
            m.cache_unfinished(i)
        elif r < 0.9:
            m.run_to_end(i, rng.randrange(2), rng.randrange(1, 8), rng.random() < 0.8)
        else:
            m.finish_or_release(i, rng.random() < 0.7)
        m.consistent()
    s = m.cache.stats()
    m.teardown()
    if not cfg[2]:
        assert m.hit_tokens > 0
        for name in ("dedup_tokens", "revived_tokens"):
            WALK_TOTALS[name] += getattr(s, name)
        WALK_TOTALS["window_miss_tokens"] += m.window_miss_tokens
    WALK_TOTALS["walks"] += 1


WALK_TOTALS = dict.fromkeys(("walks", "dedup_tokens", "revived_tokens", "window_miss_tokens"), 0)


def test_random_walk_coverage() -> None:
    """The walks above exercised dedup, revival and window misses (runs after them)."""
    if WALK_TOTALS["walks"] < 3 * len(CONFIGS):
        pytest.skip("needs every random walk to have run first")
    assert all(v > 0 for v in WALK_TOTALS.values()), WALK_TOTALS
