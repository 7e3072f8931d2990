"""Rotary position embeddings, computed per forward for the batch's positions.

Matches Hugging Face's default and linear RoPE bit for bit in fp32:
`inv_freq[i] = 1 / theta ** (2i / head_dim) / factor` for i in [0, head_dim / 2),
`angle[t, i] = position[t] * inv_freq[i]`, and the rotation pairs dimension i with
i + head_dim / 2 ("rotate half" layout).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from swakv.config import AttentionSpec


@dataclass(frozen=True)
class RopeKey:
    """What determines a RoPE table; layers with equal keys share cos/sin."""

    theta: float
    factor: float
    head_dim: int

    @classmethod
    def of(cls, spec: AttentionSpec) -> RopeKey:
        return cls(float(spec.rope_theta), float(spec.rope_scaling_factor), spec.head_dim)


def inv_freq(key: RopeKey) -> torch.Tensor:
    """fp32 [head_dim / 2] inverse frequencies (HF `_compute_*_rope_parameters`)."""
    dim = key.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim
    freq = 1.0 / (key.theta**exponents)
    if key.factor != 1.0:
        freq = freq / key.factor
    return freq


def rope_cos_sin(
    freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Half-width (cos, sin), each [T, head_dim / 2] in `dtype`, for `positions` [T].

    HF concatenates the angles with themselves to full width; both halves are equal,
    so only one is kept and `apply_rope` uses it for both.
    """
    angles = positions.to(torch.float32)[:, None] * freq[None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, heads, head_dim] by half-width cos/sin [T, head_dim / 2].

    Equal to HF's `x * cat(cos, cos) + rotate_half(x) * cat(sin, sin)`:
    first half `x1 * cos - x2 * sin`, second half `x2 * cos + x1 * sin`.
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
