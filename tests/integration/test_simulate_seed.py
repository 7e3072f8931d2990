"""The seed scenarios at real scale: Gemma 3 27B's KV shape at 60 GiB, no model, no tensors.

Each runs the real scheduler, radix cache and allocators (`EngineCore` with a
`SimExecutor`, or the allocator alone), at the pool sizes `size_pools` gives a 27B
model on an 80 GiB accelerator:
1. a prompt longer than the SWA pool is admitted (by the full pool) and served;
2. tail-only SWA preallocation (PD decode) fits more concurrent long requests than
   full-length preallocation;
3. a locked long prefix pins one window of SWA (not a whole chunked-prefill leaf);
4. a host-tier load-back under SWA pressure evicts no full KV.
"""

from __future__ import annotations

import random

import pytest

from swakv.config import EngineConfig, KVLayout
from swakv.engine.core import EngineCore
from swakv.memory.allocator.base import OutOfKVMemory
from swakv.memory.allocator.swa import SWAAllocator
from swakv.memory.pages import Need, num_pages, page_ceil, swa_tail_len
from swakv.plan.models import load_plan_model
from swakv.sampling_params import SamplingParams
from swakv.sched.cost import CostModel
from swakv.sched.sizing import PoolSizes, size_pools
from swakv.sim.executor import SimExecutor, TokenOnlyTokenizer
from swakv.sim.host import simulated_host_tier
from swakv.sim.steptime import StepTimeModel

GIB = 1 << 30
SPEC = load_plan_model("gemma-3-27b").spec
W = SPEC.window  # 1024
STEP = StepTimeModel.roofline(SPEC, 2)


def config(**kw) -> EngineConfig:
    settings = dict(kv_memory=60 * GIB, dtype="bfloat16", page_size=16, chunk_size=4096,
                    max_running_requests=64)
    settings.update(kw)
    return EngineConfig(**settings)


def real_sizes(cfg: EngineConfig) -> PoolSizes:
    cost = CostModel(W, cfg.page_size, cfg.chunk_size, cfg.decode_reserve, cfg.frontier_stride)
    return size_pools(KVLayout.from_model(SPEC, cfg.torch_dtype), cfg, cost)


def sim_engine(cfg: EngineConfig, sizes: PoolSizes | None = None) -> EngineCore:
    return EngineCore(SPEC, None, TokenOnlyTokenizer(), cfg, sizes=sizes or real_sizes(cfg),
                      executor=SimExecutor(SPEC, STEP))


def tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, SPEC.vocab_size) for _ in range(n)]


def run(eng: EngineCore, reqs, check_every: int = 50, held=()) -> int:
    """Step until `reqs` finished; returns the peak SWA that requests pinned (used minus
    what the cache could evict), in tokens."""
    peak, steps = 0, 0
    while any(not r.is_finished for r in reqs):
        eng.step()
        steps += 1
        used = eng.allocator.total() - eng.allocator.available()
        peak = max(peak, used.swa - eng.cache.evictable().swa)
        if steps % check_every == 0:
            check(eng, held)
    check(eng, held)
    return peak


def check(eng: EngineCore, held=()) -> None:
    """Integrity of the pools, rows and cache; `held`: ReqKVs admitted outside the
    scheduler (they own rows and locks too)."""
    eng.allocator.check_integrity()
    eng.req_table.check_integrity()
    eng.cache.check_integrity(eng.scheduler.live_kvs() + list(held))


def test_prompt_longer_than_swa_pool_is_served() -> None:
    cfg = config()
    eng = sim_engine(cfg)
    swa_pool = eng.sizes.swa_tokens
    full_pool = eng.sizes.full_tokens
    # 64 windows of 1104 tokens + a 4096-token chunk's 5200 would be 75,856 SWA tokens
    # (32.3 GB): capped at half the budget, 30 GiB // (416 KiB * 16) - 1 = 4725 pages;
    # the full pool gets the other 30 GiB: 24,576 - 1 pages of 16 tokens at 80 KiB each
    assert swa_pool == 4725 * 16 and full_pool == 24_575 * 16
    prompt_len = 120_000
    assert swa_pool < prompt_len < full_pool
    req = eng.add_request(tokens(prompt_len, 0), SamplingParams(max_tokens=8, ignore_eos=True))
    pinned_swa = run(eng, [req])
    assert req.finish_reason.value == "length" and req.num_output_tokens == 8
    assert req.error is None and eng.scheduler.counters.num_dropped == 0
    # the request never pinned more SWA than the cost model's prefill need (a chunk on
    # top of its window) and the window its lock holds, far below the prompt
    cost = eng.cost
    assert pinned_swa <= cost.swa_prefill(cost.chunk_size) + page_ceil(W, 16)
    eng.flush_cache()
    assert eng.allocator.available() == eng.allocator.total()


@pytest.mark.parametrize("seq_len", [32_768, 131_072 - 256])
def test_tail_only_preallocation_fits_more(seq_len) -> None:
    """`alloc_extend_swa_tail` takes SWA pages for the window tail only; a full-length
    preallocation (`alloc_extend`) takes them for every position."""
    sizes = real_sizes(config())
    p = sizes.page_size
    tail = swa_tail_len(seq_len, W, p)
    assert tail == seq_len - (seq_len - W) // p * p  # 1024 for both lengths here

    def count(alloc) -> int:
        a = SWAAllocator(sizes.num_full_pages, sizes.num_swa_pages, p)
        n = 0
        while True:
            try:
                alloc(a)
            except OutOfKVMemory:
                a.check_integrity()
                return n
            n += 1

    n_tail = count(lambda a: a.alloc_extend_swa_tail(seq_len, tail))
    n_full = count(lambda a: a.alloc_extend(0, seq_len, None))
    full_pages = num_pages(seq_len, p)
    assert n_tail == min(sizes.num_full_pages // full_pages, sizes.num_swa_pages // (tail // p))
    assert n_full == min(sizes.num_full_pages, sizes.num_swa_pages) // full_pages
    assert n_tail > n_full
    # 27B at 60 GiB: 24,575 full and 4,725 SWA pages. 32k: tail min(24,575 // 2,048,
    # 4,725 // 64) = 11, full length 4,725 // 2,048 = 2; 130,816: 3 against 0
    expected = {32_768: (11, 2), 131_072 - 256: (3, 0)}[seq_len]
    assert (n_tail, n_full) == expected


def test_locked_long_prefix_pins_one_window() -> None:
    """Three 64k-token prefixes, each prefilled in 8k chunks, then locked by three
    requests (as their admissions lock a match): each locked prefix pins exactly one
    page-aligned window of SWA (1,024 tokens, the capped leaf), not a chunk's 8,192,
    and the locked windows survive the SWA pressure of the next prefills."""
    eng = sim_engine(config(chunk_size=8192))
    tree = eng.cache.tree
    held = []
    prefixes = [tokens(65_536, 10 + k) for k in range(3)]
    for k, pfx in enumerate(prefixes):
        run(eng, [eng.add_request(pfx, SamplingParams(max_tokens=1, ignore_eos=True))],
            check_every=4, held=held)
        for j in range(3):
            prompt = pfx + [5 + j, 6, 7]
            m = eng.cache.match(prompt[:-1])
            assert m.prefix_len == 65_536
            held.append(eng.cache.admit(prompt, m))
        assert tree.full_protected == (k + 1) * 65_536
        assert tree.swa_protected == (k + 1) * page_ceil(W, 16)  # one window per prefix
    assert eng.allocator.available().swa < 8192  # the prefills kept the SWA pool full
    for pfx in prefixes:
        assert eng.cache.match(pfx + [5]).prefix_len == 65_536
    eng.cache.check_integrity(held)
    for kv in held:
        eng.cache.release(kv)
    assert tree.swa_protected == 0 and tree.full_protected == 0


def test_host_load_back_under_swa_pressure_evicts_no_full_kv() -> None:
    """A host-only 20k-token prefix is loaded back while the SWA pool is full of other
    prefixes' cached windows: the window's SWA comes from SWA-only eviction (their
    windows become tombstones), and no full page of theirs is freed or demoted."""
    cfg = config(chunk_size=2048, max_running_requests=8)
    sizes = real_sizes(cfg)
    # the real full pool; an SWA pool of 5 windows (PD-sized decode worker)
    small = PoolSizes(sizes.num_full_pages, 5 * 64 + 16, 16, sizes.full_bytes, 0)
    eng = EngineCore(SPEC, None, TokenOnlyTokenizer(), config(chunk_size=512,
                     max_running_requests=8), sizes=small, executor=SimExecutor(SPEC, STEP))
    cache = simulated_host_tier(eng, "16x", backup_threshold=1)  # ample host pools
    tree = cache.tree
    a = tokens(20_000, 100)
    run(eng, [eng.add_request(a, SamplingParams(max_tokens=1, ignore_eos=True))])
    assert tree.host_full_tokens >= 19_984  # written through to the host
    cache.evict(Need(eng.allocator.total().full, 0))  # demote everything: A is host-only
    assert cache.match(a[:-1]).prefix_len == 0 and cache.match(a[:-1]).host_prefix_len == 19_984
    others = [tokens(4_096, 200 + k) for k in range(5)]
    run(eng, [eng.add_request(o, SamplingParams(max_tokens=1, ignore_eos=True)) for o in others])
    free = eng.allocator.available()
    assert free.swa < page_ceil(W, 16)  # SWA pressure: less than one window free
    assert free.full > 20_000  # ... but plenty of full pages
    device_full = tree.full_evictable + tree.full_protected
    demoted = tree.host_counters["demoted_tokens"]
    req = eng.add_request(a + [9, 9, 9], SamplingParams(max_tokens=2, ignore_eos=True))
    eng.step()  # admission loads A back
    assert tree.host_counters["load_backs"] == 1
    assert tree.host_counters["demoted_tokens"] == demoted  # no full eviction at all
    loaded = tree.host_counters["loaded_full_tokens"]
    # A's conversation (20,000 prompt + 1 output) was committed up to 20,000; the window
    # before 20,000 is [18,977, 20,000) -> pages from 18,976: 1,024 SWA tokens
    assert loaded == 20_000 and tree.host_counters["loaded_swa_tokens"] == page_ceil(W, 16)
    # every other prefix keeps its full KV on the device; some lost their window's SWA
    matches = [cache.match(o) for o in others]
    assert all(m.full_only_len == 4_096 for m in matches)
    assert any(m.prefix_len < 4_096 for m in matches)
    assert tree.full_evictable + tree.full_protected == device_full + loaded
    run(eng, [req])
    assert req.num_output_tokens == 2 and req.cached_prompt_tokens == 20_000
