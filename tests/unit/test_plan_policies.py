"""Capacity policies against hand-computed values, and `swakv plan` on real-scale configs.

The small config: 2 full + 6 sliding layers, 1 KV head of dim 4, bf16, W = 128:
one layer costs 2 * 1 * 4 * 2 = 16 bytes per token, so F = 32 and S = 96 bytes.
Budget 1,000,000 bytes, context 1024, page 16.
"""

from __future__ import annotations

import json

import pytest
import torch

from swakv.cli import main
from swakv.config import AttentionSpec, AttnKind, ModelSpec
from swakv.plan.models import load_plan_model
from swakv.plan.policies import (
    KVShape,
    SwakvKnobs,
    llamacpp_capacity,
    no_swa_savings,
    sglang_static_split,
    swakv_capacity,
    vllm_groups,
    vllm_hybrid,
)
from swakv.plan.report import OtherKnobs, PlanError, make_plan, parse_bytes, parse_contexts

B, L = 1_000_000, 1024


def small_spec(num_full: int = 2, num_swa: int = 6, window: int = 128) -> ModelSpec:
    full = AttentionSpec(AttnKind.FULL, 1, 4, 1e6)
    swa = AttentionSpec(AttnKind.SLIDING, 1, 4, 1e4, window)
    return ModelSpec("toy", 100, 8, 16, 2, (full,) * num_full + (swa,) * num_swa,
                     max_position_embeddings=4096)


SHAPE = KVShape.of(small_spec(), torch.bfloat16)


def test_kv_shape() -> None:
    assert SHAPE == KVShape(32, 96, 2, 6, 128, 16)
    real = KVShape.of(load_plan_model("gemma-3-27b").spec, torch.bfloat16)
    assert (real.full_bytes, real.swa_bytes) == (10 * 2 * 16 * 128 * 2, 52 * 2 * 16 * 128 * 2)
    fp8 = KVShape.of(load_plan_model("gemma-3-27b").spec, torch.float8_e4m3fn)
    assert (fp8.full_bytes, fp8.swa_bytes) == (real.full_bytes // 2, real.swa_bytes // 2)


def test_no_swa_savings() -> None:
    # 128 bytes per token; 1024 tokens -> 131,072 bytes per request -> 7
    c = no_swa_savings(SHAPE, B, L)
    assert (c.num_requests, c.full_tokens) == (7, 7808)  # 1e6 // 128 = 7812 -> 7808


def test_sglang_static_split() -> None:
    # full = int(1e6 / (32 + 0.8 * 96)) = 9191 -> 9184; SWA = int(9184 * 0.8) = 7347 -> 7344;
    # a request: 1024 full, min(1024, 128 + 16) = 144 SWA -> min(8, 51) = 8
    c = sglang_static_split(SHAPE, B, L)
    assert (c.num_requests, c.full_tokens, c.swa_tokens) == (8, 9184, 7344)
    assert c.detail["swa_tokens_per_request"] == 144
    # ratio 0.1: full = int(1e6 / 41.6) = 24038 -> 24032, SWA 2403 -> 2400 -> min(23, 16)
    c = sglang_static_split(SHAPE, B, L, ratio=0.1)
    assert (c.num_requests, c.full_tokens, c.swa_tokens) == (16, 24032, 2400)


@pytest.mark.parametrize(("full", "swa", "expected"), [
    (10, 52, (10, 1, 6)),  # Gemma 3 27B: the last sliding group has 8 padding layers
    (18, 18, (18, 1, 1)),  # gpt-oss-120b
    (13, 12, (13, 1, 1)),  # within 25%: the larger count
    (0, 32, (32, 0, 1)),  # all sliding (Mistral)
    (4, 0, (4, 1, 0)),  # all full
])
def test_vllm_groups(full, swa, expected) -> None:
    assert vllm_groups(full, swa) == expected


def test_vllm_hybrid() -> None:
    # groups of 2 layers: 1 full, 3 sliding; a block id covers 16 tokens x 16 bytes x 2
    # layers = 512 bytes -> 1953 blocks. T = 8192: a sliding group holds min(127 + 8192,
    # 1024) = 1024 tokens -> 64 + 1 blocks; full 64 -> 64 + 3 * 65 = 259 -> 7 requests
    c = vllm_hybrid(SHAPE, B, L)
    assert (c.num_requests, c.detail["num_blocks"], c.detail["blocks_per_request"]) == (7, 1953, 259)
    assert c.detail["padding_layers"] == 0
    # T = 256: min(383, 1024) = 383 -> 24 + 1 blocks per sliding group -> 64 + 75 = 139 -> 14
    c = vllm_hybrid(SHAPE, B, L, max_num_batched_tokens=256)
    assert (c.num_requests, c.detail["blocks_per_request"]) == (14, 139)


def test_llamacpp() -> None:
    # per slot, n_ubatch 64: 1024 full cells, pad256(min(1024, 192)) = 256 SWA cells ->
    # 32,768 + 24,576 = 57,344 bytes -> 17 slots
    c = llamacpp_capacity(SHAPE, B, L, n_ubatch=64)
    assert (c.num_requests, c.full_tokens, c.swa_tokens) == (17, 17 * 1024, 17 * 256)
    # n_ubatch 512: pad256(640) = 768 SWA cells -> 106,496 bytes -> 9
    assert llamacpp_capacity(SHAPE, B, L).num_requests == 9
    # unified, n_ubatch 64: N = 21 -> 21,504 full cells (688,128 B) + pad256(128 * 21 + 64 =
    # 2752) = 2816 SWA cells (270,336 B) = 958,464 B; N = 22 -> 720,896 + 294,912 > 1e6
    c = llamacpp_capacity(SHAPE, B, L, n_ubatch=64, unified=True)
    assert (c.num_requests, c.full_tokens, c.swa_tokens) == (21, 21504, 2816)


# swakv sizes its pools with EngineConfig, which takes budgets of at least 1 MiB.
B2 = 2_000_000


def test_swakv_capacity() -> None:
    # page 16, chunk 64, reserve 16, stride 16: swa_steady = page_ceil(128 + 16 + 16) = 160;
    # swa_prefill(64) = page_ceil(127 + 64) + 16 + 16 = 224 -> transient 64 tokens.
    # fixed = 16 * 32 + (64 + 16) * 96 = 8192; per request 1024 * 32 + 160 * 96 = 48,128
    # -> n = 1,991,808 // 48,128 = 41; SWA bytes (41 * 160 + 80) * 96 = 637,440
    knobs = SwakvKnobs(page_size=16, chunk_size=64, decode_reserve=16, frontier_stride=16)
    c = swakv_capacity(small_spec(), torch.bfloat16, B2, L, knobs)
    assert c.num_requests == 41
    assert c.detail["swa_fraction"] == 0.318721  # (637,440.5 / 2e6) rounded up
    # size_pools: SWA int(2e6 * 0.318721) = 637,442 // 1536 - 1 = 414 pages;
    # full 1,362,558 // 512 - 1 = 2660 pages
    assert (c.swa_tokens, c.full_tokens) == (414 * 16, 2660 * 16)
    assert (c.swa_tokens - 64) // 160 == 41 and c.full_tokens // 1024 == 41


def test_swakv_capacity_zero_byte_pools() -> None:
    knobs = SwakvKnobs(page_size=16, chunk_size=64, decode_reserve=16, frontier_stride=16)
    # no sliding layers: 2 full layers only, 32 B per token -> (2e6 - 512) // 32,768 = 61
    c = swakv_capacity(small_spec(num_swa=0), torch.bfloat16, B2, L, knobs)
    assert c.num_requests == 61 and c.swa_bytes == 0 and c.swa_tokens == c.full_tokens
    # no full layers: 6 sliding, 96 B per token; (2e6 - 80 * 96) // (160 * 96) = 129
    c = swakv_capacity(small_spec(num_full=0), torch.bfloat16, B2, L, knobs)
    assert c.num_requests == 129 and c.full_bytes == 0
    assert c.full_tokens == 2 * 129 * 1024  # zero-byte slots: 2 x running x context


def test_swakv_capacity_rejects_tiny_budget() -> None:
    with pytest.raises(ValueError, match="1 MiB"):
        swakv_capacity(small_spec(), torch.bfloat16, 1_000_000, L)
    assert main(["plan", "--model", "gemma-3-1b", "--kv-memory", "1000"]) == 2


def test_parse() -> None:
    assert parse_contexts("8k, 32k,1000") == (8192, 32768, 1000)
    assert parse_bytes("60GiB") == 60 << 30 and parse_bytes("80G") == 80 * 10**9
    assert parse_bytes("512MiB") == 512 << 20 and parse_bytes("1000") == 1000
    for bad in ("", "x", "-3G"):
        with pytest.raises(PlanError):
            parse_bytes(bad)
    with pytest.raises(PlanError):
        parse_contexts("8k,zero")
    # the serve flag's size syntax (`swakv.config.parse_size`), in whole bytes
    assert parse_bytes("2e9") == 2 * 10**9 and parse_bytes("1.5GiB") == 3 << 29
    assert parse_bytes("60 gib") == 60 << 30
    for bad in ("0", "0.5", "inf", "nan"):
        with pytest.raises(PlanError):
            parse_bytes(bad)


def test_knobs_are_validated() -> None:
    """Knob dataclasses refuse values no engine accepts (like the bench workloads)."""
    for name in ("page_size", "chunk_size", "decode_reserve", "frontier_stride"):
        with pytest.raises(PlanError, match=f"swakv {name} must be >= 1"):
            SwakvKnobs(**{name: 0})
    for kw in ({"vllm_block_size": 0}, {"vllm_max_batched_tokens": 0}, {"llamacpp_ubatch": -1}):
        with pytest.raises(PlanError, match=f"{next(iter(kw))} must be >= 1"):
            OtherKnobs(**kw)
    for ratio in (0.0, 1.5, float("nan")):
        with pytest.raises(PlanError, match="sglang_swa_ratio must be in"):
            OtherKnobs(sglang_swa_ratio=ratio)
    assert main(["plan", "--model", "gemma-3-1b", "--kv-memory", "1GiB", "--chunk-size", "0"]) == 2
    assert main(["plan", "--model", "gemma-3-1b", "--kv-memory", "1GiB",
                 "--sglang-swa-ratio", "2"]) == 2


def test_plan_beyond_context_limit() -> None:
    plan = make_plan(load_plan_model("gemma-2-9b"), 60 << 30, (8192, 32768))
    for _, caps in plan.rows:
        assert caps[0] is not None and caps[1] is None  # Gemma 2: 8k context limit


@pytest.mark.parametrize(("model", "swakv_row", "no_savings_row"), [
    ("gemma-3-27b", [56, 20, 5], [15, 3, 0]),
    ("gpt-oss-120b", [207, 52, 13], [106, 26, 6]),
])
def test_plan_cli_table(capsys, model, swakv_row, no_savings_row) -> None:
    """`swakv plan` at 60 GiB prints every policy; no-savings is B // (L * (F + S)):
    Gemma 3 27B: 496 KiB per token -> 60 GiB / (8k * 496 KiB) = 15.5."""
    assert main(["plan", "--model", model, "--kv-memory", "60GiB"]) == 0
    out = capsys.readouterr().out
    rows = {}
    table = out.split("\npolicy ")[1].split("\n\n")[0]  # header to the blank line
    for line in table.splitlines():
        for name in ("swakv", "no SWA savings", "SGLang static split (0.8)",
                     "vLLM hybrid allocator", "llama.cpp per slot", "llama.cpp unified KV"):
            if line.startswith(name + " "):
                rows[name] = [int(x) for x in line[len(name):].split()]
    assert len(rows) == 6 and all(len(v) == 3 for v in rows.values())
    assert rows["swakv"] == swakv_row and rows["no SWA savings"] == no_savings_row
    assert "8k" in out and "--swa-fraction" in out
    others = out.split("\nothers' pools\n")[1].splitlines()
    assert [line.split(":")[0] for line in others] == [
        "  SGLang static split (0.8)", "  vLLM hybrid allocator", "  llama.cpp"]
    assert others[2] == "  llama.cpp: n_ubatch 512, cells padded to 256"
    assert main(["plan", "--model", model, "--kv-memory", "60GiB", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [p["per_context"][0]["num_requests"] for p in data["policies"]][:2] == [
        swakv_row[0], no_savings_row[0]]


def test_plan_cli_errors(capsys) -> None:
    assert main(["plan", "--model", "no-such-model", "--kv-memory", "60GiB"]) == 2
    assert "no-such-model" in capsys.readouterr().err
    assert main(["plan", "--model", "gemma-3-1b", "--kv-memory", "lots"]) == 2
    assert "not a size" in capsys.readouterr().err
