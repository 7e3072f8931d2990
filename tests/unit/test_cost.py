"""Cost model, pool sizing, capacity line and the SWA-bounded chunk size."""

from __future__ import annotations

import pytest
import torch

from swakv.config import AttentionSpec, AttnKind, EngineConfig, KVLayout
from swakv.engine.core import effective_chunk_size
from swakv.memory.pages import Need
from swakv.sched.cost import CostModel
from swakv.sched.sizing import PoolTooSmall, capacity_line, size_pools

FULL = AttentionSpec(AttnKind.FULL, num_kv_heads=1, head_dim=256, rope_theta=1e6)
SWA = AttentionSpec(AttnKind.SLIDING, num_kv_heads=1, head_dim=256, rope_theta=1e4, window=512)
GEMMA_LIKE = KVLayout(layers=(SWA,) * 5 + (FULL,) + (SWA,) * 5 + (FULL,) + (SWA,) * 5 + (FULL,))


@pytest.mark.parametrize(
    "length,remaining,chunk,expected",
    [
        # decoding: full = page_ceil(L + min(remaining, reserve)); swa = W + P + S
        (1000, 500, 0, Need(1264, 512 + 16 + 64)),  # page_ceil(1256)
        (1000, 10, 0, Need(1008 + 16, 592)),
        # short request: SWA never above its full need
        (20, 5, 0, Need(32, 32)),
        # prefilling a 512-token chunk: page_ceil(W - 1 + 512) + P + S
        (4000, 128, 512, Need(4128, 1024 + 16 + 64)),
    ],
)
def test_need_for(length, remaining, chunk, expected):
    cost = CostModel(window=512, page_size=16, chunk_size=512, decode_reserve=256,
                     frontier_stride=64)
    assert cost.need_for(length, remaining, chunk) == expected


def test_no_sliding_layers_need_no_swa():
    cost = CostModel(window=None, page_size=16, chunk_size=512, decode_reserve=256,
                     frontier_stride=64)
    assert cost.need_for(100, 10, 0) == Need(112, 0)
    assert cost.swa_steady() == 0 and cost.swa_prefill(512) == 0


@pytest.mark.parametrize(
    "page,stride,window,swa_tokens,chunk,expected",
    [
        (4, 4, 8, 40, 64, 25),  # page_floor(40 - 4 - 4) - 7
        (4, 4, 8, 40, 10, 10),  # the configured chunk is smaller
        (16, 64, 512, 2048, 4096, 1457),  # page_floor(2048 - 16 - 64) - 511
        (1, 1, 8, 12, 64, 3),
    ],
)
def test_effective_chunk_size(page, stride, window, swa_tokens, chunk, expected):
    cfg = EngineConfig(page_size=page, frontier_stride=stride, chunk_size=chunk)
    got = effective_chunk_size(cfg, window, swa_tokens)
    assert got == expected
    cost = CostModel(window, page, got, 8, stride)
    assert cost.swa_prefill(got) <= swa_tokens
    if got < chunk:
        assert cost.swa_prefill(got + 1) > swa_tokens


def test_effective_chunk_size_rejects_tiny_swa_pool():
    with pytest.raises(PoolTooSmall):
        effective_chunk_size(EngineConfig(page_size=16), 512, 512)


def test_size_pools_splits_budget_and_reports_capacity():
    cfg = EngineConfig(kv_memory=2 << 30, page_size=16, max_running_requests=32,
                       chunk_size=512)
    cost = CostModel(512, 16, 512, cfg.decode_reserve, cfg.frontier_stride)
    layout = KVLayout(GEMMA_LIKE.layers, dtype=torch.float32)
    sizes = size_pools(layout, cfg, cost)
    assert sizes.full_bytes + sizes.swa_bytes <= 2 << 30
    # SWA pool holds every running request's steady window plus one prefill transient
    assert sizes.swa_tokens >= 32 * cost.swa_steady() + cost.swa_prefill(512) - 16
    line = capacity_line(sizes, cost)
    assert "of 8k tokens" in line and "of 32k" in line
    n8k = sizes.full_tokens // 8192
    assert f"{min(n8k, sizes.swa_tokens // cost.swa_steady())} of 8k" in line


def test_size_pools_with_explicit_swa_fraction():
    cfg = EngineConfig(kv_memory=1 << 30, page_size=16, swa_fraction=0.5)
    cost = CostModel(512, 16, 512, 256, 64)
    sizes = size_pools(GEMMA_LIKE, cfg, cost)
    assert abs(sizes.swa_bytes - (1 << 29)) <= 16 * GEMMA_LIKE.bytes_per_token(True)


def test_size_pools_too_small():
    with pytest.raises(PoolTooSmall):
        size_pools(GEMMA_LIKE, EngineConfig(kv_memory=1 << 20, page_size=16),
                   CostModel(512, 16, 512, 256, 64))
