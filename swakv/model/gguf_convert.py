"""GGUF (llama.cpp) -> Hugging Face conversion for Gemma 3.

`convert_gguf(gguf_path, out_dir)` writes config.json, model.safetensors (fp32, HF
tensor names), the tokenizer files and (when the GGUF has `general.sampling.*`
metadata) generation_config.json. `swakv.model.loader` decides when to convert and
where the result is cached; it re-exports every public name here.

GGUF conventions undone for Gemma 3, verified tensor by tensor against
`transformers`' own GGUF loader (max abs diff 0):

- every `*norm.weight` (attn_norm, post_attention_norm, ffn_norm, post_ffw_norm,
  attn_q_norm, attn_k_norm, output_norm) is stored as `1 + w`; HF stores `w`
  (the norm computes `x * (1 + w)`), so we subtract 1;
- q/k projections are NOT permuted for gemma3 (llama.cpp only permutes the
  `llama` arch family), so no un-permute is applied;
- GGUF lists dims innermost-first (`[in, out]`); `GGUFReader` already exposes the
  data in row-major `(out, in)` order, which is the HF `nn.Linear` layout, so no
  transpose is needed after dequantization.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from swakv.model.hf_dir import CONFIG_FILE, WEIGHTS_FILE, ModelLoadError
from swakv.model.spec import (
    GEMMA3_GLOBAL_ROPE_THETA,
    GEMMA3_LOCAL_ROPE_THETA,
    GEMMA3_SLIDING_WINDOW_PATTERN,
    _layer_types,
    _opt_int,
)

_LAYER_TENSOR_MAP = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSOR_MAP = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_GLOBAL_RE = re.compile(r"^(\w+)\.(weight|bias)$")

def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Write config.json, model.safetensors (fp32), tokenizer files and (when the GGUF
    has `general.sampling.*` metadata) generation_config.json for a GGUF.

    `out_dir` must exist; files are written directly into it (callers make it a
    temporary directory and rename it when this returns). Progress (one step per
    tensor, then the tokenizer) is drawn on stderr when it is a terminal.
    """
    from safetensors.torch import save_file

    from swakv.model.generation_config import (
        GENERATION_CONFIG_FILE,
        GGUF_SAMPLING_KEYS,
        generation_config_from_gguf,
    )
    from swakv.model.tokenizer import save_tokenizer_from_gguf

    reader = _open_gguf(gguf_path)
    with _progress(len(reader.tensors) + 1, f"converting {gguf_path.name}") as bar:
        weights = gguf_weights_to_hf(reader, gguf_path, on_tensor=bar.update)
        config = hf_config_from_gguf(reader, gguf_path, weights)
        save_file(weights, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
        (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
        bar.set_postfix_str("tokenizer")
        save_tokenizer_from_gguf(gguf_path, out_dir,
                                 gguf_field(reader, "tokenizer.chat_template"))
        bar.update()
        bar.refresh()  # draw the finished count even within tqdm's redraw interval
    sampling = generation_config_from_gguf({k: gguf_field(reader, k) for k in GGUF_SAMPLING_KEYS})
    if sampling:
        (out_dir / GENERATION_CONFIG_FILE).write_text(json.dumps(sampling, indent=2))


def _progress(total: int, desc: str) -> Any:
    """A tqdm bar on stderr, drawn only when stderr is a terminal (logs stay clean)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=not sys.stderr.isatty(),
                leave=False, dynamic_ncols=True)


def _open_gguf(gguf_path: Path) -> Any:
    import gguf

    try:
        return gguf.GGUFReader(str(gguf_path))
    except Exception as e:  # gguf raises ValueError/IndexError/struct errors on bad files
        raise ModelLoadError(f"cannot read GGUF file {gguf_path}: {e}") from e


def gguf_field(reader: Any, key: str, default: Any = None) -> Any:
    """The value of metadata `key` in a GGUFReader (scalar, str or list), or default."""
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def hf_tensor_name(gguf_name: str) -> str:
    """Map a llama.cpp Gemma 3 tensor name to the HF Gemma3ForCausalLM name.

    Example: "blk.3.ffn_norm.weight" -> "model.layers.3.pre_feedforward_layernorm.weight".
    Raises ModelLoadError for names this converter does not know.
    """
    m = _LAYER_RE.match(gguf_name)
    if m and m.group(2) in _LAYER_TENSOR_MAP:
        return f"model.layers.{m.group(1)}.{_LAYER_TENSOR_MAP[m.group(2)]}.{m.group(3)}"
    m = _GLOBAL_RE.match(gguf_name)
    if m and m.group(1) in _GLOBAL_TENSOR_MAP:
        return f"{_GLOBAL_TENSOR_MAP[m.group(1)]}.{m.group(2)}"
    raise ModelLoadError(f"unknown GGUF tensor {gguf_name!r}")


def gguf_weights_to_hf(reader: Any, gguf_path: Path,
                       on_tensor: Callable[[], Any] | None = None) -> dict[str, torch.Tensor]:
    """Dequantize every tensor of a Gemma 3 GGUF to fp32 under its HF name.

    Norm weights get -1 (GGUF stores 1 + w). No permutes or transposes are needed.
    `on_tensor()` is called after each tensor (progress).
    """
    from gguf.quants import dequantize

    arch = gguf_field(reader, "general.architecture")
    if arch != "gemma3":
        raise ModelLoadError(f"{gguf_path}: unsupported GGUF architecture {arch!r} (need gemma3)")
    out: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        try:
            arr = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        except Exception as e:
            raise ModelLoadError(f"{gguf_path}: cannot dequantize tensor {t.name}: {e}") from e
        if t.name.endswith("norm.weight"):
            arr = arr - np.float32(1.0)
        out[hf_tensor_name(t.name)] = torch.from_numpy(np.ascontiguousarray(arr))
        if on_tensor is not None:
            on_tensor()
    return out


def hf_config_from_gguf(
    reader: Any, gguf_path: Path, weights: Mapping[str, torch.Tensor]
) -> dict[str, Any]:
    """Build a `gemma3_text` config.json dict from GGUF metadata.

    Values GGUF does not carry follow llama.cpp's Gemma 3 defaults: full attention on
    every 6th layer, local RoPE base 10000, query_pre_attn_scalar = head_dim
    (hidden/heads for the 62-layer 27B), no softcaps.
    """

    def req(key: str) -> Any:
        value = gguf_field(reader, f"gemma3.{key}")
        if value is None:
            raise ModelLoadError(f"{gguf_path}: missing GGUF metadata gemma3.{key}")
        return value

    n_layers = int(req("block_count"))
    hidden = int(req("embedding_length"))
    heads = int(req("attention.head_count"))
    head_dim = int(gguf_field(reader, "gemma3.attention.key_length", hidden // heads))
    pattern = int(
        gguf_field(reader, "gemma3.attention.sliding_window_pattern", GEMMA3_SLIDING_WINDOW_PATTERN)
    )
    full_rope: dict[str, Any] = {
        "rope_type": "default",
        "rope_theta": float(gguf_field(reader, "gemma3.rope.freq_base", GEMMA3_GLOBAL_ROPE_THETA)),
    }
    factor = float(gguf_field(reader, "gemma3.rope.scaling.factor", 1.0) or 1.0)
    if factor != 1.0:
        full_rope.update(rope_type="linear", factor=factor)
    scalar = hidden // heads if n_layers == 62 else head_dim
    eos = _eos_ids_from_gguf(reader)
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": int(weights["model.embed_tokens.weight"].shape[0]),
        "hidden_size": hidden,
        "intermediate_size": int(req("feed_forward_length")),
        "num_hidden_layers": n_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": int(gguf_field(reader, "gemma3.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": int(req("context_length")),
        "rms_norm_eps": _f32_shortest(req("attention.layer_norm_rms_epsilon")),
        "sliding_window": int(req("attention.sliding_window")),
        "layer_types": _layer_types(n_layers, pattern),
        "rope_parameters": {
            "full_attention": full_rope,
            "sliding_attention": {"rope_type": "default", "rope_theta": GEMMA3_LOCAL_ROPE_THETA},
        },
        "query_pre_attn_scalar": scalar,
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_bidirectional_attention": False,
        "tie_word_embeddings": "lm_head.weight" not in weights,
        "bos_token_id": _opt_int(gguf_field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": eos,
        "pad_token_id": _opt_int(gguf_field(reader, "tokenizer.ggml.padding_token_id")),
        "dtype": "float32",
    }


def _f32_shortest(value: Any) -> float:
    """GGUF stores f32 metadata; 9.99999997e-07 -> 1e-06 (the value HF configs carry)."""
    return float(repr(np.float32(value)).removeprefix("np.float32(").removesuffix(")"))


def _eos_ids_from_gguf(reader: Any) -> list[int]:
    """GGUF eos id plus `<end_of_turn>` (Gemma chat turns end with it) when present."""
    ids: list[int] = []
    eos = gguf_field(reader, "tokenizer.ggml.eos_token_id")
    if eos is not None:
        ids.append(int(eos))
    eot = gguf_field(reader, "tokenizer.ggml.eot_token_id")
    if eot is None:
        eot = _token_index(reader, "<end_of_turn>")
    if eot is not None and int(eot) not in ids:
        ids.append(int(eot))
    return ids


def _token_index(reader: Any, token: str) -> int | None:
    field = reader.fields.get("tokenizer.ggml.tokens")
    if field is None:
        return None
    target = token.encode()
    for i, idx in enumerate(field.data):
        if bytes(field.parts[idx]) == target:
            return i
    return None
