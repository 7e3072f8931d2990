"""How many requests of one context length fit a KV budget, under several engines' rules.

Every policy is one small function of the same inputs: the model's KV shape (`KVShape`:
K+V bytes per token of all full layers `F` and of all sliding layers `S`, layer counts,
window `W`), the budget `B` in bytes and the context `L` (prompt + output tokens of
every request; all requests at their longest). Each returns a `Capacity`: the number
of concurrent requests and the pool sizes behind it. The rules are the engines'
published sizing code, simplified only where it says so:

- `swakv_capacity`: swakv's cost model (`CostModel`): a request holds `page_ceil(L)`
  full tokens and `min(page_ceil(L), page_ceil(W + P + S_f))` SWA tokens, plus one
  prefill chunk's transient SWA; the budget is split so both pools fill at the same
  count, and `size_pools` with the flags it prints reproduces the split.
- `no_swa_savings`: every layer keeps every token: `B // (page_ceil(L) * (F + S))`.
- `sglang_static_split`: SGLang's `set_num_tokens_hybrid_swa`: full tokens
  `B / (F + r * S)`, SWA tokens `r` times that (`swa_full_tokens_ratio` r, default
  0.8), both page aligned. A request is charged `page_ceil(L)` full tokens and at
  least the window plus one page of SWA tokens (as if SGLang freed out-of-window SWA as
  early as possible; it holds more while prefilling, so this row is an upper bound).
- `vllm_hybrid`: vLLM's hybrid allocator: layers grouped per attention type into
  groups of equal size (the smallest type's layer count, or the largest when within
  25%), the last group of a type padded; one block pool of
  `B // (block_bytes_per_layer * group_size)` blocks; a request takes per full group
  `cdiv(L, block)` blocks and per sliding group `cdiv(min(W - 1 + T, L), block) + 1`
  (T = max_num_batched_tokens): `get_max_concurrency_for_kv_cache_config`.
- `llamacpp_capacity`: llama.cpp's `llama_kv_cache_iswa`: per slot (a separate stream)
  `pad256(L)` full cells and `pad256(min(L, W + n_ubatch))` SWA cells; with a unified
  cache one stream of `pad256(N * L)` full and `pad256(min(N * L, W * N + n_ubatch))`
  SWA cells.

Tokens are counted in cells of one position across all layers of a pool.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from swakv.config import MIB, EngineConfig, KVLayout, ModelSpec
from swakv.memory.pages import page_ceil
from swakv.sched.cost import CostModel
from swakv.sched.sizing import PoolSizes, PoolTooSmall, size_pools


class PlanError(ValueError):
    """Plan parameters that cannot be planned (sizes, knobs, contexts, dtypes)."""


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class KVShape:
    """What capacity depends on: bytes per token per pool, layer counts, window."""

    full_bytes: int  # F: K+V bytes of one token over all full layers
    swa_bytes: int  # S: the same over all sliding layers
    num_full_layers: int
    num_swa_layers: int
    window: int | None
    layer_bytes: int  # K+V bytes of one token in one layer (the largest layer)

    @classmethod
    def of(cls, spec: ModelSpec, dtype: torch.dtype) -> KVShape:
        layout = KVLayout.from_model(spec, dtype)
        elem = torch.empty((), dtype=dtype).element_size()
        return cls(layout.bytes_per_token(sliding=False), layout.bytes_per_token(sliding=True),
                   len(spec.full_layer_ids), len(spec.swa_layer_ids), spec.window,
                   max(2 * a.num_kv_heads * a.head_dim * elem for a in spec.layers))


@dataclass(frozen=True)
class Capacity:
    """`num_requests` concurrent requests of `context` tokens; pools in tokens (cells of
    one position across a pool's layers) and bytes; `detail` names the policy's knobs."""

    policy: str
    context: int
    num_requests: int
    full_tokens: int
    swa_tokens: int
    full_bytes: int
    swa_bytes: int
    detail: dict = field(default_factory=dict)


# ---- swakv -----------------------------------------------------------------------------

@dataclass(frozen=True)
class SwakvKnobs:
    """The engine settings swakv's sizing depends on; defaults are `swakv serve`'s."""

    page_size: int = EngineConfig.page_size
    chunk_size: int = EngineConfig.chunk_size
    decode_reserve: int = EngineConfig.decode_reserve
    frontier_stride: int = EngineConfig.frontier_stride

    def __post_init__(self) -> None:
        for name in ("page_size", "chunk_size", "decode_reserve", "frontier_stride"):
            if getattr(self, name) < 1:
                raise PlanError(f"swakv {name} must be >= 1")


def swakv_capacity(spec: ModelSpec, dtype: torch.dtype, budget: int, context: int,
                   knobs: SwakvKnobs | None = None) -> Capacity:
    """Most requests of `context` tokens swakv holds at once in `budget` bytes, with the
    pool split (`--swa-fraction`, `--max-running-requests`) that achieves it.

    Per request: full `f = page_ceil(L)`, SWA `s = min(f, swa_steady)`; one prefill chunk
    adds `t = min(f, swa_prefill(chunk)) - s` SWA tokens. N is the largest n with
    `(n f + P) F + (n s + t + P) S <= B` (P: each pool's padding page); the pools
    `size_pools` makes for the printed flags are checked to hold N.
    Example (F = 2, S = 6 bytes, W 8, page 4, chunk 4, stride 4, L 32, B 1000): f 32,
    s = page_ceil(8 + 4 + 4) = 16, t = 20 - 16 = 4 -> (32n + 4) 2 + (16n + 4 + 4) 6 <= 1000
    -> n = 5; `--swa-fraction 0.5285` gives 21 SWA pages (84 tokens = 5 * 16 + 4).
    """
    if budget < MIB:  # EngineConfig's floor: smaller budgets are mistyped sizes
        raise ValueError(f"swakv sizes KV budgets of at least 1 MiB, got {budget} bytes")
    knobs = knobs or SwakvKnobs()
    p = knobs.page_size
    shape = KVShape.of(spec, dtype)
    cost = CostModel(spec.window, p, knobs.chunk_size, knobs.decode_reserve,
                     knobs.frontier_stride)
    f = page_ceil(context, p)
    s = min(f, cost.swa_steady()) if shape.swa_bytes else 0
    t = max(0, min(f, cost.swa_prefill(knobs.chunk_size)) - s) if shape.swa_bytes else 0
    fixed = p * shape.full_bytes + (t + p) * shape.swa_bytes
    per_request = f * shape.full_bytes + s * shape.swa_bytes
    n = max(0, (budget - fixed) // per_request)
    detail = {"swa_tokens_per_request": s, "prefill_transient_swa_tokens": t,
              "max_running_requests": n, "swa_fraction": None}
    if n == 0:
        return Capacity("swakv", context, 0, 0, 0, 0, 0, detail)
    fraction = None
    if shape.full_bytes and shape.swa_bytes:  # half a byte over, rounded up to 6 decimals
        swa_bytes = (n * s + t + p) * shape.swa_bytes
        fraction = min(0.999999, math.ceil((swa_bytes + 0.5) / budget * 1e6) / 1e6)
    cfg = EngineConfig(page_size=p, kv_memory=budget, swa_fraction=fraction,
                       max_running_requests=int(n), chunk_size=knobs.chunk_size,
                       decode_reserve=knobs.decode_reserve,
                       frontier_stride=knobs.frontier_stride, max_context=context)
    try:
        sizes = size_pools(KVLayout.from_model(spec, dtype), cfg, cost, max_context=context)
    except PoolTooSmall:
        return Capacity("swakv", context, 0, 0, 0, 0, 0, detail)
    fits = _swakv_fits(sizes, f, s, t)
    detail.update(max_running_requests=int(n), swa_fraction=fraction)
    return Capacity("swakv", context, min(int(n), fits), sizes.full_tokens, sizes.swa_tokens,
                    sizes.full_bytes, sizes.swa_bytes, detail)


def _swakv_fits(sizes: PoolSizes, f: int, s: int, t: int) -> int:
    by_full = sizes.full_tokens // f
    by_swa = (sizes.swa_tokens - t) // s if s else by_full
    return max(0, min(by_full, by_swa))


# ---- the others ----------------------------------------------------------------------

def no_swa_savings(shape: KVShape, budget: int, context: int, page: int = 16) -> Capacity:
    """Every layer keeps every token: `B // (page_ceil(L) * (F + S))` requests."""
    per_token = shape.full_bytes + shape.swa_bytes
    tokens = budget // per_token // page * page
    n = budget // (page_ceil(context, page) * per_token)
    return Capacity("no SWA savings", context, n, tokens, 0, tokens * per_token, 0,
                    {"page_size": page})


def sglang_static_split(shape: KVShape, budget: int, context: int, page: int = 16,
                        ratio: float = 0.8) -> Capacity:
    """SGLang's static split (module docstring). A model without full layers puts the
    whole budget in the SWA pool; one without sliding layers is not hybrid in SGLang
    (every layer in one pool)."""
    if shape.swa_bytes == 0:
        cap = no_swa_savings(shape, budget, context, page)
        return Capacity("SGLang static split", context, cap.num_requests, cap.full_tokens, 0,
                        cap.full_bytes, 0, {"swa_full_tokens_ratio": ratio})
    if shape.full_bytes == 0:
        full, swa = 0, budget // shape.swa_bytes // page * page
    else:
        full = int(budget / (shape.full_bytes + ratio * shape.swa_bytes)) // page * page
        swa = int(full * ratio) // page * page
    f = page_ceil(context, page)
    s = min(f, page_ceil(shape.window, page) + page)  # type: ignore[arg-type]
    n = min(full // f if shape.full_bytes else swa // s, swa // s)
    return Capacity("SGLang static split", context, n, full, swa, full * shape.full_bytes,
                    swa * shape.swa_bytes, {"swa_full_tokens_ratio": ratio,
                                            "swa_tokens_per_request": s})


def vllm_groups(num_full_layers: int, num_swa_layers: int) -> tuple[int, int, int]:
    """(group size, full groups, sliding groups) of vLLM's uniform-page-size grouping.

    Example: Gemma 3 27B (10 full, 52 sliding): size 10, 1 full group, 6 sliding groups
    (the last holds 2 layers and 8 padding layers); gpt-oss-120b (18, 18): 18, 1, 1.
    """
    counts = [c for c in (num_full_layers, num_swa_layers) if c]
    size = min(counts)
    if max(counts) < size * 1.25:
        size = max(counts)
    return size, cdiv(num_full_layers, size), cdiv(num_swa_layers, size)


def vllm_hybrid(shape: KVShape, budget: int, context: int, block_size: int = 16,
                max_num_batched_tokens: int = 8192) -> Capacity:
    """vLLM's hybrid KV cache manager (module docstring). `max_num_batched_tokens`
    defaults to vLLM's value for its OpenAI server on GPUs with >= 70 GiB (8192).
    Layers of different per-token sizes would have their pages unified by vLLM; here
    every layer is charged the largest layer's bytes."""
    size, full_groups, swa_groups = vllm_groups(shape.num_full_layers, shape.num_swa_layers)
    block_bytes = block_size * shape.layer_bytes * size  # one block id across `size` tensors
    num_blocks = budget // block_bytes
    per_request = full_groups * cdiv(context, block_size)
    if swa_groups:
        window_tokens = min(shape.window - 1 + max_num_batched_tokens, context)  # type: ignore[operator]
        per_request += swa_groups * (cdiv(window_tokens, block_size) + 1)
    n = num_blocks // per_request
    padding = size * (full_groups + swa_groups) - shape.num_full_layers - shape.num_swa_layers
    return Capacity("vLLM hybrid allocator", context, n, num_blocks * block_size, 0,
                    num_blocks * block_bytes, 0,
                    {"block_size": block_size, "num_blocks": num_blocks, "group_size": size,
                     "full_groups": full_groups, "sliding_groups": swa_groups,
                     "padding_layers": padding, "blocks_per_request": per_request,
                     "max_num_batched_tokens": max_num_batched_tokens})


LLAMACPP_CELL_PAD = 256  # llama.cpp pads a KV cache's cell count to a multiple of this


def pad256(n: int) -> int:
    return cdiv(n, LLAMACPP_CELL_PAD) * LLAMACPP_CELL_PAD


def llamacpp_capacity(shape: KVShape, budget: int, context: int, n_ubatch: int = 512,
                      unified: bool = False) -> Capacity:
    """llama.cpp's interleaved-SWA cache (module docstring); `n_ubatch` 512 by default."""
    name = "llama.cpp unified KV" if unified else "llama.cpp per slot"

    def cells(n: int) -> tuple[int, int]:
        """(full cells, SWA cells) of n slots of `context` tokens."""
        if not unified:
            swa = pad256(min(context, shape.window + n_ubatch)) if shape.swa_bytes else 0  # type: ignore[operator]
            return n * pad256(context), n * swa
        full = pad256(n * context)
        swa = pad256(min(n * context, shape.window * n + n_ubatch)) if shape.swa_bytes else 0  # type: ignore[operator]
        return full, swa

    def fits(n: int) -> bool:
        full, swa = cells(n)
        return full * shape.full_bytes + swa * shape.swa_bytes <= budget

    lo, hi = 0, 1
    while fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    full, swa = cells(lo)
    return Capacity(name, context, lo, full, swa, full * shape.full_bytes, swa * shape.swa_bytes,
                    {"n_ubatch": n_ubatch, "unified": unified})
