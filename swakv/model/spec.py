"""Hugging Face config.json -> ModelSpec (layer kinds, windows, RoPE per kind).

Two entry points:
- `spec_from_hf_config`: the spec of a model swakv's model code runs (Gemma 3), exact in
  everything the forward pass reads (RoPE per layer kind included). The loader uses it.
- `kv_spec_from_hf_config`: the spec of any supported hybrid sliding-window model
  (Gemma 2 and 3, gpt-oss, Mistral-style all-sliding models, Llama/Qwen-style models
  with or without a window), exact in what the KV cache, the cost model and the
  planner read: layer kinds, window, KV heads, head dim, context limit. For
  architectures other than Gemma 3 the RoPE fields are informational only (theta;
  non-linear scaling such as gpt-oss's YaRN is not representable and is left at 1.0).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from swakv.config import AttentionSpec, AttnKind, ModelSpec

GEMMA3_MODEL_TYPES = ("gemma3_text", "gemma3")  # what swakv's model code runs

# Gemma 3 defaults that GGUF metadata does not carry (llama.cpp hard-codes them too).
GEMMA3_SLIDING_WINDOW_PATTERN = 6  # every 6th layer is full attention
GEMMA3_LOCAL_ROPE_THETA = 10_000.0
GEMMA3_GLOBAL_ROPE_THETA = 1_000_000.0
GEMMA3_DEFAULT_QUERY_PRE_ATTN_SCALAR = 256
GEMMA3_DEFAULT_MAX_POSITIONS = 131_072


def _layer_types(n_layers: int, pattern: int) -> list[str]:
    """HF layer_types for a period-`pattern` layout: layer i is full iff (i+1) % pattern == 0."""
    return [
        "full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n_layers)
    ]


class UnsupportedArchitecture(ValueError):
    """A config whose architecture swakv cannot describe (or, for serving, cannot run)."""


def spec_from_hf_config(cfg: Mapping[str, Any]) -> ModelSpec:
    """Derive a ModelSpec from a Gemma 3 HF config dict (text or multimodal wrapper).

    Accepts both the transformers 5 form (`layer_types`, `rope_parameters` keyed by
    layer type) and the older hub form (`sliding_window_pattern`, `rope_theta`,
    `rope_local_base_freq`, `rope_scaling`). Sliding layers get
    `window = sliding_window` (query i sees keys j with i - W < j <= i); full layers
    get the global RoPE theta and the linear scaling factor, if any.

    Example: 18 layers, sliding_window_pattern 6 -> layers 5, 11, 17 are full.
    A config without `model_type` is read as Gemma 3; any other architecture raises
    UnsupportedArchitecture (its capacity can still be planned: `kv_spec_from_hf_config`).
    """
    model_type = cfg.get("model_type", "gemma3_text")
    if model_type not in GEMMA3_MODEL_TYPES:
        raise UnsupportedArchitecture(
            f"swakv's model code runs Gemma 3 only, not {model_type!r}; `swakv plan` and "
            "`swakv simulate` accept this config")
    if "text_config" in cfg and model_type == "gemma3":
        cfg = cfg["text_config"]
    if cfg.get("use_bidirectional_attention"):
        raise ValueError("bidirectional Gemma 3 attention is not supported")
    n_layers = int(cfg["num_hidden_layers"])
    heads = int(cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // heads)
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    rope = _rope_params(cfg)
    layers = tuple(
        _attention_spec(t, kv_heads, head_dim, rope[t], cfg.get("sliding_window"))
        for t in _hf_layer_types(cfg, n_layers)
    )
    return ModelSpec(
        arch=str(cfg.get("model_type", "gemma3_text")),
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["intermediate_size"]),
        num_heads=heads,
        layers=layers,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        query_pre_attn_scalar=float(
            cfg.get("query_pre_attn_scalar", GEMMA3_DEFAULT_QUERY_PRE_ATTN_SCALAR)
        ),
        attn_logit_softcap=_opt_float(cfg.get("attn_logit_softcapping")),
        final_logit_softcap=_opt_float(cfg.get("final_logit_softcapping")),
        max_position_embeddings=int(
            cfg.get("max_position_embeddings", GEMMA3_DEFAULT_MAX_POSITIONS)
        ),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        bos_token_id=_opt_int(cfg.get("bos_token_id")),
        eos_token_ids=_id_tuple(cfg.get("eos_token_id")),
        pad_token_id=_opt_int(cfg.get("pad_token_id")),
    )


def kv_spec_from_hf_config(cfg: Mapping[str, Any]) -> ModelSpec:
    """ModelSpec of any supported hybrid sliding-window model (see the module docstring).

    Layer kinds, by `model_type` (all as transformers derives them when a config has
    no explicit `layer_types`; an explicit `layer_types` always wins):
    - gemma3 / gemma3_text: `spec_from_hf_config` (period `sliding_window_pattern`, 6);
    - gemma2, gpt_oss: alternating, layer i sliding iff i is even;
    - qwen2 / qwen3 (and their MoE variants): sliding iff `use_sliding_window` and
      i >= `max_window_layers`;
    - anything else (mistral, llama, ...): every layer sliding when `sliding_window`
      is set (Mistral 7B v0.1: 32 sliding layers of W = 4096), else every layer full.
    Sliding layers see keys j with i - W < j <= i (transformers' sliding-window mask,
    the same for all of these). A multimodal wrapper's `text_config` is read.

    Example: gpt-oss-120b (36 layers, sliding_window 128) -> 18 sliding layers (0, 2,
    ..., 34) with W = 128 and 18 full layers.
    """
    model_type = str(cfg.get("model_type", "gemma3_text"))
    if model_type in GEMMA3_MODEL_TYPES:
        return spec_from_hf_config(cfg)
    if isinstance(cfg.get("text_config"), Mapping):
        inner = dict(cfg["text_config"])
        inner.setdefault("model_type", model_type)
        return kv_spec_from_hf_config(inner)
    n_layers = int(cfg["num_hidden_layers"])
    heads = int(cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // heads)
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    window = cfg.get("sliding_window", cfg.get("sliding_window_size"))
    types = _generic_layer_types(cfg, model_type, n_layers, window)
    theta = _generic_rope_theta(cfg)
    layers = tuple(_attention_spec(t, kv_heads, head_dim, (theta, 1.0), window) for t in types)
    return ModelSpec(
        arch=model_type,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg.get("intermediate_size") or 0),
        num_heads=heads,
        layers=layers,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        bos_token_id=_opt_int(cfg.get("bos_token_id")),
        eos_token_ids=_id_tuple(cfg.get("eos_token_id")),
        pad_token_id=_opt_int(cfg.get("pad_token_id")),
    )


_ALTERNATING = ("gemma2", "gpt_oss")  # layer i sliding iff (i + 1) % 2
_QWEN = ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe")


def _generic_layer_types(cfg: Mapping[str, Any], model_type: str, n_layers: int,
                         window: Any) -> list[str]:
    """HF layer types of a non-Gemma-3 config (rules in `kv_spec_from_hf_config`)."""
    if cfg.get("layer_types") is not None:
        return _hf_layer_types(cfg, n_layers)
    if model_type in _ALTERNATING:
        types = _layer_types(n_layers, 2)
    elif model_type in _QWEN:
        start = int(cfg.get("max_window_layers", n_layers))
        on = bool(cfg.get("use_sliding_window")) and window is not None
        types = ["sliding_attention" if on and i >= start else "full_attention"
                 for i in range(n_layers)]
    else:
        kind = "full_attention" if window is None else "sliding_attention"
        types = [kind] * n_layers
    return _hf_layer_types({"layer_types": types}, n_layers)


def _generic_rope_theta(cfg: Mapping[str, Any]) -> float:
    """RoPE theta of a non-Gemma-3 config: `rope_theta`, else `rope_parameters` (flat or
    keyed by layer type: the full layers' theta), else transformers' default 10000."""
    if cfg.get("rope_theta") is not None:
        return float(cfg["rope_theta"])
    rp = cfg.get("rope_parameters")
    if isinstance(rp, Mapping):
        rp = rp.get("full_attention", rp)
        if isinstance(rp, Mapping) and rp.get("rope_theta") is not None:
            return float(rp["rope_theta"])
    return 10_000.0


def _hf_layer_types(cfg: Mapping[str, Any], n_layers: int) -> list[str]:
    types = cfg.get("layer_types")
    if types is None:
        types = _layer_types(
            n_layers, int(cfg.get("sliding_window_pattern") or GEMMA3_SLIDING_WINDOW_PATTERN)
        )
    if len(types) != n_layers:
        raise ValueError(f"layer_types has {len(types)} entries for {n_layers} layers")
    bad = set(types) - {"full_attention", "sliding_attention"}
    if bad:
        raise ValueError(f"unsupported layer types {sorted(bad)}")
    return list(types)


def _rope_params(cfg: Mapping[str, Any]) -> dict[str, tuple[float, float]]:
    """(theta, linear scaling factor) per HF layer type.

    transformers 5: `rope_parameters = {"full_attention": {...}, "sliding_attention": {...}}`
    (or one flat dict for both); older configs: `rope_theta` (full),
    `rope_local_base_freq` (sliding), `rope_scaling` (full only).
    """
    rp = cfg.get("rope_parameters")
    if isinstance(rp, Mapping) and ("full_attention" in rp or "sliding_attention" in rp):
        full = rp.get("full_attention") or {}
        sliding = rp.get("sliding_attention") or {}
    elif isinstance(rp, Mapping):
        full = sliding = rp
    else:
        full = dict(cfg.get("rope_scaling") or {})
        full.setdefault("rope_theta", cfg.get("rope_theta", GEMMA3_GLOBAL_ROPE_THETA))
        sliding = {"rope_theta": cfg.get("rope_local_base_freq", GEMMA3_LOCAL_ROPE_THETA)}
    return {
        "full_attention": (
            float(full.get("rope_theta", GEMMA3_GLOBAL_ROPE_THETA)),
            _linear_factor(full),
        ),
        "sliding_attention": (
            float(sliding.get("rope_theta", GEMMA3_LOCAL_ROPE_THETA)),
            _linear_factor(sliding),
        ),
    }


def _linear_factor(params: Mapping[str, Any]) -> float:
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return 1.0
    if kind == "linear":
        return float(params["factor"])
    raise ValueError(f"unsupported rope_type {kind!r}")


def _attention_spec(
    layer_type: str,
    kv_heads: int,
    head_dim: int,
    rope: tuple[float, float],
    sliding_window: int | None,
) -> AttentionSpec:
    theta, factor = rope
    if layer_type == "full_attention":
        return AttentionSpec(AttnKind.FULL, kv_heads, head_dim, theta, None, factor)
    if sliding_window is None:
        raise ValueError("sliding layers need a sliding_window")
    return AttentionSpec(AttnKind.SLIDING, kv_heads, head_dim, theta, int(sliding_window), factor)


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _id_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)
