"""The Hugging Face model-directory format swakv reads: config.json, *.safetensors.

Contract: `load_model_dir(path)` reads such a directory (weights under HF tensor names,
multimodal `language_model` prefixes stripped) and checks every tensor the spec needs
is present with its shape; any missing, truncated or corrupt file raises
`ModelLoadError` naming the file. `swakv.model.loader` re-exports every public name.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from swakv.config import ModelSpec
from swakv.model.jsonfile import read_json_object
from swakv.model.spec import spec_from_hf_config

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class ModelLoadError(RuntimeError):
    """A model file is missing, truncated, corrupt or of an unsupported kind."""


@dataclass(frozen=True)
class LoadedModel:
    """A model read from an HF-style directory: its spec and its weights (HF names)."""

    spec: ModelSpec
    weights: dict[str, torch.Tensor]
    path: Path


def is_complete_dir(path: Path) -> bool:
    """Whether `path` holds a finished conversion (config.json and model.safetensors)."""
    return (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def check_hf_dir(path: Path) -> None:
    """ModelLoadError unless `path` has config.json and at least one *.safetensors."""
    if not (path / CONFIG_FILE).is_file():
        raise ModelLoadError(f"model directory {path} has no {CONFIG_FILE}")
    if not _safetensors_files(path):
        raise ModelLoadError(f"no *.safetensors file in {path}")


def _safetensors_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def load_model_dir(path: str | os.PathLike[str]) -> LoadedModel:
    """Read config.json and all *.safetensors of an HF-style dir (weights in HF names).

    Checks that every tensor the spec requires is present with the right shape;
    raises ModelLoadError naming the offending file otherwise.
    """
    path = Path(path)
    check_hf_dir(path)
    cfg = read_config(path / CONFIG_FILE)
    try:
        spec = spec_from_hf_config(cfg)
    except (KeyError, ValueError, TypeError) as e:
        raise ModelLoadError(f"{path / CONFIG_FILE}: invalid model config: {e}") from e
    weights: dict[str, torch.Tensor] = {}
    for f in _safetensors_files(path):
        weights.update(_read_safetensors(f))
    weights = _strip_prefix(weights)
    _check_weights(spec, weights, path)
    return LoadedModel(spec=spec, weights=weights, path=path)


def read_config(config_path: Path) -> dict[str, Any]:
    """Parse a config.json; ModelLoadError if missing or not a JSON object."""
    return read_json_object(config_path, ModelLoadError, "model config")


def _read_safetensors(f: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(f))
    except Exception as e:  # SafetensorError, OSError: truncated or corrupt file
        raise ModelLoadError(f"cannot read weights file {f}: {e}") from e


def _strip_prefix(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map multimodal Gemma3ForConditionalGeneration names to text names.

    "model.language_model.X" / "language_model.model.X" -> "model.X"; vision tensors
    are dropped. Plain text checkpoints are returned unchanged.
    """
    if not any("language_model" in k for k in weights):
        return weights
    out: dict[str, torch.Tensor] = {}
    for k, v in weights.items():
        for prefix in ("model.language_model.", "language_model.model."):
            if k.startswith(prefix):
                out["model." + k[len(prefix) :]] = v
        if k in ("lm_head.weight", "language_model.lm_head.weight"):
            out["lm_head.weight"] = v
    return out


def expected_weight_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """The HF tensor names and shapes a Gemma 3 text model of `spec` must have."""
    h, inter = spec.hidden_size, spec.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (spec.vocab_size, h),
        "model.norm.weight": (h,),
    }
    if not spec.tie_word_embeddings:
        shapes["lm_head.weight"] = (spec.vocab_size, h)
    for i, a in enumerate(spec.layers):
        p = f"model.layers.{i}."
        q_out, kv_out = spec.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
        shapes |= {
            p + "self_attn.q_proj.weight": (q_out, h),
            p + "self_attn.k_proj.weight": (kv_out, h),
            p + "self_attn.v_proj.weight": (kv_out, h),
            p + "self_attn.o_proj.weight": (h, q_out),
            p + "self_attn.q_norm.weight": (a.head_dim,),
            p + "self_attn.k_norm.weight": (a.head_dim,),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "pre_feedforward_layernorm.weight": (h,),
            p + "post_feedforward_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (inter, h),
            p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
        }
    return shapes


def _check_weights(spec: ModelSpec, weights: Mapping[str, torch.Tensor], path: Path) -> None:
    files = ", ".join(str(f) for f in _safetensors_files(path))
    for name, shape in expected_weight_shapes(spec).items():
        t = weights.get(name)
        if t is None:
            raise ModelLoadError(f"weights file(s) {files}: missing tensor {name}")
        if tuple(t.shape) != shape:
            raise ModelLoadError(
                f"weights file(s) {files}: tensor {name} has shape {tuple(t.shape)}, expected {shape}"
            )
