"""Arithmetic work of a forward pass, counted from the model spec (multiply-add = 2).

Used by the benches that turn time into GFLOPS (bench/speed.py) or work into a bound on
time (bench/bounds.py). Counts only what any exact engine must compute: the weight
matmuls of every computed token, the LM head of every sampled token and the attention
of every query over the keys it may see (full layers: all earlier positions; sliding
layers: the last `window`). Norms, RoPE and activations are a few percent and ignored.
"""

from __future__ import annotations

from swakv.config import ModelSpec


def linear_flops_per_token(spec: ModelSpec) -> float:
    """FLOPs of all layers' weight matmuls (q/k/v, o, gate/up, down) for one token."""
    total = 0
    for a in spec.layers:
        qkv = (spec.num_heads + 2 * a.num_kv_heads) * a.head_dim * spec.hidden_size
        o = spec.num_heads * a.head_dim * spec.hidden_size
        total += qkv + o + 3 * spec.intermediate_size * spec.hidden_size
    return 2.0 * total


def head_flops_per_token(spec: ModelSpec) -> float:
    """FLOPs of the LM head for one sampled token."""
    return 2.0 * spec.vocab_size * spec.hidden_size


def attention_flops(spec: ModelSpec, pos: int) -> float:
    """FLOPs of one query at position `pos` (0-based) over all layers: QK^T and PV."""
    total = 0.0
    for a in spec.layers:
        keys = pos + 1 if a.window is None else min(pos + 1, a.window)
        total += 4.0 * spec.num_heads * a.head_dim * keys
    return total


def attention_flops_range(spec: ModelSpec, lo: int, hi: int) -> float:
    """Sum of attention_flops over positions lo..hi-1 (lo <= hi), closed form per layer."""
    total = 0.0
    for a in spec.layers:
        w = hi if a.window is None else a.window
        # position p sees min(p + 1, w) keys: causal up to position w - 1, then w each
        split = min(max(lo, w), hi)
        keys = _tri(split) - _tri(min(lo, split)) + (hi - split) * w
        total += 4.0 * spec.num_heads * a.head_dim * keys
    return total


def _tri(n: int) -> int:
    """1 + 2 + ... + n: keys seen by positions 0..n-1 of a causal layer."""
    return n * (n + 1) // 2
