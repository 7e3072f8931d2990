"""Hypothesis state machine over the host tier: requests (match, admit with load-back,
chunked compute, commits, finish or release), device eviction (demotion), host
eviction and extra hits (backups) against real device and host pools.

Reference model: every KV row written holds (token, position). After every step each
live request's full KV and window re-read correctly through its row, every match's
device part and every backed-up node's host copy re-read correctly, and
`check_integrity()` (device, host, mapping, one owner per device and host page,
root-connected device and backup sets) holds. At the end every pool, device and
host, is back at its initial free count."""

from __future__ import annotations

import os
import random

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from test_hicache import Rig

from swakv.memory import Need, OutOfKVMemory
from swakv.memory.pages import page_floor

CONFIGS = [(1, 3, 1), (4, 3, 1), (4, 4, 2), (4, 9, 1), (16, 8, 2), (16, 37, 1)]
_rng = random.Random(11)
BASES = [tuple(_rng.randrange(3) for _ in range(8 * 16)) for _ in range(3)]
MAX_LIVE = 3


class HostMachine(RuleBasedStateMachine):
    @initialize(cfg=st.sampled_from(CONFIGS))
    def setup(self, cfg) -> None:
        page, window, threshold = cfg
        self.page, self.window = page, window
        # the invariant below checks after every rule, so the rig does not check per call
        self.rig = Rig(page, window, full_pages=28, swa_pages=14, host_full=20, host_swa=12,
                       threshold=threshold, check_every_step=False)
        self.live = self.rig.live  # one list: the rig adds on admit, drops on finish/release

    # ---- helpers ------------------------------------------------------------------
    def _prompt(self, base: int, cut: int, tail: list[int]) -> list[int]:
        return list(BASES[base][: cut * self.page // 2]) + tail[: 2 * self.page]

    def _verify_match(self, tokens: list[int]) -> None:
        m = self.rig.cache.match(tokens)
        p, w = self.page, self.window
        assert m.prefix_len <= m.host_prefix_len <= page_floor(len(tokens), p)
        assert m.prefix_len <= m.full_only_len
        want = torch.tensor([[t, i] for i, t in enumerate(tokens[: m.prefix_len])],
                            dtype=torch.float32).reshape(-1, 2)
        assert torch.equal(self.rig.kv.full_k[0][m.full_slots, 0], want)
        lo = max(0, m.prefix_len - (w - 1))
        win = m.full_slots[lo:]
        assert torch.equal(self.rig.kv.swa_k[0][self.rig.alloc.translate(win), 0], want[lo:])

    def _drop(self, kv, finished: bool) -> None:
        (self.rig.finish if finished else self.rig.release)(kv)
        assert kv not in self.live and kv.row == -1

    def _pick(self, i: int):
        return self.live[i % len(self.live)]

    # ---- rules ----------------------------------------------------------------------
    @precondition(lambda self: len(self.live) < MAX_LIVE)
    @rule(base=st.integers(0, 2), cut=st.integers(1, 16),
          tail=st.lists(st.integers(0, 2), max_size=6))
    def new_request(self, base, cut, tail) -> None:
        tokens = self._prompt(base, cut, tail)
        if not tokens:
            return
        self._verify_match(tokens)
        try:
            kv = self.rig.admit(tokens)
        except OutOfKVMemory:
            return
        assert self.live[-1] is kv
        self.rig.verify(kv, kv.protected_len)

    @precondition(lambda self: bool(self.live))
    @rule(i=st.integers(0, 9), chunk=st.integers(1, 24), commit=st.booleans())
    def compute(self, i, chunk, commit) -> None:
        kv = self._pick(i)
        end = min(len(kv.token_ids), kv.kv_len + chunk)
        if end == kv.kv_len:
            kv.token_ids.append(1)  # decode one more token
            end += 1
        need = self.rig.cache.extend_need(kv, end - kv.kv_len)
        if not self.rig.cache.can_allocate(need):
            self.rig.cache.evict((need - self.rig.cache.available()).clamp_min(0))
        if not self.rig.cache.can_allocate(need):
            self._drop(kv, finished=False)
            return
        self.rig.compute(kv, end)
        if commit:
            self.rig.cache.cache_unfinished(kv)

    @precondition(lambda self: bool(self.live))
    @rule(i=st.integers(0, 9), finished=st.booleans())
    def finish(self, i, finished) -> None:
        self._drop(self._pick(i), finished)

    @rule(full=st.integers(0, 64), swa=st.integers(0, 64))
    def evict_device(self, full, swa) -> None:
        before = self.rig.alloc.available()
        freed = self.rig.cache.evict(Need(full, swa))
        assert self.rig.alloc.available() - before == freed

    @rule(full=st.integers(0, 8), swa=st.integers(0, 8))
    def evict_host(self, full, swa) -> None:
        before = self.rig.host.available_pages()
        freed = self.rig.tree.evict_host(Need(full, swa))
        assert self.rig.host.available_pages() - before == freed

    @precondition(lambda self: bool(self.live))
    @rule(i=st.integers(0, 9))
    def extra_hit(self, i) -> None:
        """Another use of a live request's locked path: may trigger a backup."""
        kv = self._pick(i)
        self.rig.tree.note_hits(kv.lock.end_node)
        self.rig.tree.maybe_backup(kv.lock.end_node)

    @rule(base=st.integers(0, 2), cut=st.integers(1, 16))
    def probe(self, base, cut) -> None:
        self._verify_match(self._prompt(base, cut, []))

    # ---- invariants -------------------------------------------------------------------
    @invariant()
    def consistent(self) -> None:
        if not hasattr(self, "rig"):
            return
        self.rig.check(self.live)
        for kv in self.live:
            self.rig.verify(kv, kv.kv_len)
        self._verify_host_copies()

    def _verify_host_copies(self) -> None:
        """Every backed-up node's host pages hold its (token, position) rows."""
        p, host = self.page, self.rig.host
        stack = [(self.rig.tree.root, ())]
        while stack:
            node, toks = stack.pop()
            for child in node.children.values():
                seq = toks + child.key
                if child.host_full is not None:
                    want = torch.tensor([[t, child.start + i] for i, t in enumerate(child.key)],
                                        dtype=torch.float32)
                    slots = (child.host_full[:, None] * p + torch.arange(p)).reshape(-1)
                    assert torch.equal(host.full_k[0][slots, 0], want), f"{child}: host full"
                    if child.host_swa is not None:
                        sw = (child.host_swa[:, None] * p + torch.arange(p)).reshape(-1)
                        assert torch.equal(host.swa_k[0][sw, 0], want), f"{child}: host SWA"
                stack.append((child, seq))

    def teardown(self) -> None:
        if not hasattr(self, "rig"):
            return
        for kv in list(self.live):
            self._drop(kv, finished=True)
        r = self.rig
        r.cache.evict(Need(10**9, 10**9))
        r.tree.evict_host(Need(10**9, 10**9))
        r.check([])
        assert r.alloc.available() == r.alloc.total(), "device pools not back at baseline"
        assert r.host.available() == r.host.total(), "host pools not back at baseline"
        assert r.tree.num_nodes == 0
        r.close()  # also: request rows back, KV pool intact


HostMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("SWAKV_HOST_EXAMPLES", 150)),
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestHostMachine = HostMachine.TestCase


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_host_random_walk(cfg, seed) -> None:
    """Long seeded programs over the same rules; they must exercise every operation."""
    rng = random.Random(seed)
    m = HostMachine()
    m.setup(cfg)
    m.consistent()
    for _ in range(200):
        r, i = rng.random(), rng.randrange(10)
        if r < 0.2 and len(m.live) < MAX_LIVE:
            m.new_request(rng.randrange(3), rng.randrange(1, 17),
                          [rng.randrange(3) for _ in range(rng.randrange(7))])
        elif r < 0.45 and m.live:
            m.compute(i, rng.randrange(1, 25), rng.random() < 0.5)
        elif r < 0.55 and m.live:
            m.finish(i, rng.random() < 0.8)
        elif r < 0.7:
            m.evict_device(rng.randrange(65), rng.randrange(65))
        elif r < 0.8:
            m.evict_host(rng.randrange(9), rng.randrange(9))
        elif r < 0.9 and m.live:
            m.extra_hit(i)
        else:
            m.probe(rng.randrange(3), rng.randrange(1, 17))
        m.consistent()
    c = dict(m.rig.tree.host_counters)
    m.teardown()
    for name in ("backed_up_full_tokens", "demoted_tokens", "loaded_full_tokens",
                 "host_evicted_full_tokens"):
        WALK[name] += c[name]
    WALK["walks"] += 1


WALK = dict.fromkeys(("walks", "backed_up_full_tokens", "demoted_tokens",
                      "loaded_full_tokens", "host_evicted_full_tokens"), 0)


def test_host_random_walk_coverage() -> None:
    """The walks above backed up, demoted, loaded back and host-evicted (runs after)."""
    assert WALK["walks"] == 3 * len(CONFIGS), "needs every random walk to have run first"
    assert all(v > 0 for v in WALK.values()), WALK
