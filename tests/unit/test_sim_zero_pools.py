"""Models without full layers or without sliding layers in the memory core.

A pool whose layers cost zero bytes per token still names token slots (DESIGN §2):
- no sliding layers: the SWA pool has as many pages as the full pool (it never limits an
  allocation) and the cache's window is unbounded, so no SWA is ever freed;
- no full layers: the whole budget is SWA; the full pool has zero bytes and enough
  pages for 2 x max_running_requests requests of the context limit.
"""

from __future__ import annotations

import torch

from swakv.cache import PrefixCache, RadixTree
from swakv.cache.base import UNBOUNDED_WINDOW
from swakv.config import AttentionSpec, AttnKind, EngineConfig, KVLayout, ModelSpec
from swakv.memory.allocator.swa import SWAAllocator
from swakv.memory.req_table import ReqTable
from swakv.sched.cost import CostModel
from swakv.sched.sizing import size_pools
from swakv.sim.simulator import Simulator
from swakv.sim.steptime import StepTimeModel
from swakv.sim.trace import Segment, Session, Trace, Turn

PAGE = 4


def spec(kinds: str, window: int = 8) -> ModelSpec:
    layers = tuple(AttentionSpec(AttnKind.SLIDING, 1, 4, 1e4, window) if k == "S"
                   else AttentionSpec(AttnKind.FULL, 1, 4, 1e6) for k in kinds)
    return ModelSpec("z", 128, 16, 32, 2, layers, max_position_embeddings=256)


def cfg(**kw) -> EngineConfig:
    settings = dict(page_size=PAGE, kv_memory=1 << 20, chunk_size=16, max_running_requests=4,
                    decode_reserve=8, frontier_stride=4)
    settings.update(kw)
    return EngineConfig(**settings)


def trace() -> Trace:
    """Four sessions sharing a 30-token prefix, two turns each."""
    return Trace("z", tuple(Session(0.05 * i, (
        Turn(5, (Segment((1, 0), 30), Segment((2, i, 0), 7))),
        Turn(4, (Segment((2, i, 1), 6),), think_time=0.01))) for i in range(4)))


def test_sizes_without_sliding_layers() -> None:
    s = spec("FFF")
    layout = KVLayout.from_model(s, torch.bfloat16)
    sizes = size_pools(layout, cfg(), CostModel(None, PAGE, 16, 8, 4))
    # 3 layers x 16 B = 48 B per token: 1,048,576 // (48 * 4) - 1 = 5460 pages
    assert (sizes.num_full_pages, sizes.num_swa_pages, sizes.swa_bytes) == (5460, 5460, 0)


def test_sizes_without_full_layers() -> None:
    s = spec("SSSS")
    layout = KVLayout.from_model(s, torch.bfloat16)
    sizes = size_pools(layout, cfg(), CostModel(8, PAGE, 16, 8, 4), max_context=256)
    # 4 layers x 16 B = 64 B per token: 1,048,576 // (64 * 4) - 1 = 4095 SWA pages; full:
    # 2 x 4 running x 64 pages of the 256-token context, zero bytes
    assert (sizes.num_swa_pages, sizes.full_bytes) == (4095, 0)
    assert sizes.num_full_pages == 2 * 4 * 64
    default = size_pools(layout, cfg(), CostModel(8, PAGE, 16, 8, 4))
    assert default.num_full_pages == 2 * 4 * 131_072 // PAGE  # DEFAULT_SLOT_CONTEXT


def test_unbounded_window_in_the_cache() -> None:
    alloc = SWAAllocator(16, 16, PAGE)
    cache = PrefixCache(alloc, ReqTable(2, 64), PAGE, None)
    assert cache.window == UNBOUNDED_WINDOW and cache.tree.window == UNBOUNDED_WINDOW
    assert RadixTree(alloc, PAGE, None).cap == UNBOUNDED_WINDOW
    # a 40-token prefix: every position stays usable (no tombstones, no window cap)
    kv = cache.admit(list(range(40)), cache.match(list(range(39))))
    cache.extend(kv, 40)
    cache.mark_computed(kv, 40)
    assert cache.advance_frontier(kv, 40) == 0  # nothing ever leaves the window
    cache.cache_finished(kv)
    assert cache.match(list(range(41))).prefix_len == 40
    cache.check_integrity([])


def run(s: ModelSpec, **kw):
    sim = Simulator(s, cfg(**kw), StepTimeModel(0.01, 1e-4, 1e-6), integrity_every=1)
    r = sim.run(trace())
    assert r.integrity_checks == r.num_steps + 2  # every step, the end, the flushed end
    assert sim.core.allocator.available() == sim.core.allocator.total()  # baseline
    return sim, r


def test_serves_without_sliding_layers() -> None:
    sim, r = run(spec("FFF"))
    assert (r.num_finished, r.num_failed, r.retractions) == (8, 0, 0) and r.at_baseline
    # later sessions hit the 28 shared tokens (page floor of 30); second turns their own
    # first conversation: 37 + 5 outputs -> page_floor(42 - 1) = 40
    assert r.prefix_hit_ratio == (3 * 28 + 4 * 40) / (4 * 37 + 4 * (42 + 6))
    assert r.peak_used["swa_tokens"] == r.peak_used["full_tokens"]  # the mirror
    assert r.peak_used["swa_bytes"] == 0


def test_serves_without_full_layers() -> None:
    sim, r = run(spec("SSSS"))
    # slots for 2 x 4 running requests of the model's 256-token limit, or of --max-context
    assert sim.core.sizes.num_full_pages == 2 * 4 * 256 // PAGE
    capped = Simulator(spec("SSSS"), cfg(max_context=128), StepTimeModel(0.01, 1e-4, 1e-6))
    assert capped.core.sizes.num_full_pages == 2 * 4 * 128 // PAGE
    assert capped.core.max_context == 128
    assert (r.num_finished, r.num_failed) == (8, 0) and r.at_baseline
    assert r.peak_used["full_bytes"] == 0 and r.pools["full_bytes"] == 0
    assert r.prefix_hit_ratio > 0
