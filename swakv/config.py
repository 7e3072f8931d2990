"""Frozen configuration dataclasses: model spec and attention kinds.

Attention kinds are data: every layer names an `AttentionSpec`; code that needs to
treat full and sliding layers differently reads the spec, never the layer index.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import torch


class AttnKind(str, Enum):
    FULL = "full"
    SLIDING = "sliding"


@dataclass(frozen=True)
class AttentionSpec:
    """One kind of attention layer.

    A SLIDING layer with window W lets the query at position i see keys at positions
    j with i - W < j <= i (Gemma 3 / Hugging Face convention: W keys including i).
    """

    kind: AttnKind
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    window: int | None = None  # set iff kind is SLIDING
    rope_scaling_factor: float = 1.0  # linear RoPE scaling (positions divided by it)

    def __post_init__(self) -> None:
        if (self.kind is AttnKind.SLIDING) != (self.window is not None):
            raise ValueError(f"window must be set exactly for sliding layers: {self}")
        if self.window is not None and self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")

    @property
    def is_sliding(self) -> bool:
        return self.kind is AttnKind.SLIDING


@dataclass(frozen=True)
class ModelSpec:
    """Everything the pools, the model code and the scheduler need to know of a model.

    `layers[i]` is the attention spec of global layer i. All sliding layers share one
    window (one SWA pool); `window` returns it.
    """

    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    layers: tuple[AttentionSpec, ...]
    rms_norm_eps: float = 1e-6
    query_pre_attn_scalar: float | None = None  # attention scale = scalar**-0.5
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        windows = {a.window for a in self.layers if a.is_sliding}
        if len(windows) > 1:
            raise ValueError(f"all sliding layers must share one window, got {sorted(windows)}")

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def window(self) -> int | None:
        """The sliding window W, or None for a model without sliding layers."""
        for a in self.layers:
            if a.is_sliding:
                return a.window
        return None

    @property
    def full_layer_ids(self) -> tuple[int, ...]:
        return tuple(i for i, a in enumerate(self.layers) if not a.is_sliding)

    @property
    def swa_layer_ids(self) -> tuple[int, ...]:
        return tuple(i for i, a in enumerate(self.layers) if a.is_sliding)


@dataclass(frozen=True)
class KVLayout:
    """What the KV pools store: per global layer, which pool and the K/V shape.

    Built from a ModelSpec with `KVLayout.from_model(spec, dtype)`.
    """

    layers: tuple[AttentionSpec, ...]
    dtype: torch.dtype = torch.float32

    @classmethod
    def from_model(cls, spec: ModelSpec, dtype: torch.dtype = torch.float32) -> KVLayout:
        return cls(layers=spec.layers, dtype=dtype)

    @property
    def window(self) -> int | None:
        for a in self.layers:
            if a.is_sliding:
                return a.window
        return None

    def bytes_per_token(self, sliding: bool) -> int:
        """K+V bytes one token costs across all layers of one pool."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        return sum(
            2 * a.num_kv_heads * a.head_dim * elem for a in self.layers if a.is_sliding == sliding
        )
