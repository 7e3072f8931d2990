"""On-disk cache of quantized (packed) weights, beside the dequantized model files.

Layout: `<dir>/<format>-<digest[:16]>.safetensors`, where
- `<dir>` is `<model dir>/quant/` when the model directory lives under swakv's cache
  (`loader.cache_dir()`, e.g. a converted GGUF), else `cache_dir()/quant/` (swakv never
  writes into a user's model directory);
- `<format>` names the mode's packed formats: "int8-g<group size>" (int8),
  "w8a8-g<group size>" (per output channel int8 where the w8a8 kernel runs, grouped
  int8 elsewhere: `quant.weight_format`) or "int4s-g<group size>" (int4, spans
  snapped to a source grid);
- `<digest>` is the sha256 of the format version, the format and every source tensor
  (name, dtype, shape and bytes, in name order).
The file holds, per linear name, the plain tensors of its packed weights
("<name>.qweight", ...) and metadata {format_version, format, digest}. It is written
to a temporary file in the same directory and renamed into place, so it exists
complete or not at all. A file that cannot be read, or whose metadata, tensor names,
dtypes or shapes do not match, is rebuilt and replaced. In a directory that holds one
model's files (`model_owns_cache`), writing a file removes the ones it makes stale:
the same format for other source weights, and formats this version no longer writes
(`prune_stale`; w8a8's smoothing factors, `smooth-*`, share the directory and the rule).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from swakv.model.quant import (
    INT4_GROUP_SIZE,
    INT8_GROUP_SIZE,
    Int4Weights,
    Int8GroupWeights,
    Int8Weights,
    PackedWeights,
    Quantization,
    quantize_weight,
    role_of,
    weight_format,
)

FORMAT_VERSION = "1"  # bump when quantization or the file layout changes
log = logging.getLogger("swakv.model")


def packed_format(mode: Quantization) -> str:
    if mode is Quantization.INT4:
        return f"int4s-g{INT4_GROUP_SIZE}"  # "s": scales snapped to a source grid
    if mode is Quantization.INT8:
        return f"int8-g{INT8_GROUP_SIZE}"
    if mode is Quantization.W8A8:
        return f"w8a8-g{INT8_GROUP_SIZE}"
    raise ValueError(f"mode {mode} has no packed weights")


def quant_cache_dir(model_dir: Path) -> Path:
    """Where packed weights of the model in `model_dir` are cached (see module doc)."""
    from swakv.model.loader import cache_dir

    if model_owns_cache(model_dir):
        return model_dir.resolve() / "quant"
    return cache_dir().resolve() / "quant"


def cache_for(weights_dir: Path | None) -> tuple[Path | None, bool]:
    """(the cache dir of the model in `weights_dir`, whether stale files there may be
    pruned); (None, False) without a model dir (nothing is cached)."""
    if weights_dir is None:
        return None, False
    return quant_cache_dir(weights_dir), model_owns_cache(weights_dir)


def model_owns_cache(model_dir: Path) -> bool:
    """Whether `quant_cache_dir(model_dir)` holds this model's files only (a model
    directory under swakv's cache root), so files it no longer reads may be removed."""
    from swakv.model.loader import cache_dir

    return model_dir.resolve().is_relative_to(cache_dir().resolve())


def current_formats() -> set[str]:
    """The file formats (name prefixes) this version of swakv writes to a cache dir."""
    from swakv.model.smoothing import SMOOTH_FORMAT

    return {packed_format(m) for m in Quantization if m is not Quantization.NONE} | {
        SMOOTH_FORMAT}


def prune_stale(cache: Path, written: Path) -> list[Path]:
    """In a directory holding one model's cache files, after `written` was written:
    remove the other `<format>-<digest>.safetensors` files of its format (made for
    earlier source weights, e.g. before a change to how w8a8 smooths them) and those
    of formats this version no longer writes (`current_formats`). Other files are
    left alone. Returns what was removed; a file that cannot be removed is logged."""
    fmt = written.name.rsplit("-", 1)[0]
    keep = current_formats() - {fmt}
    removed = []
    for path in cache.glob("*.safetensors"):
        if path == written or path.name.startswith(".") or "-" not in path.name:
            continue
        if path.name.rsplit("-", 1)[0] in keep:
            continue
        try:
            path.unlink()
            removed.append(path)
        except OSError as e:
            log.warning("cannot remove stale cache file %s: %s", path, e)
    if removed:
        log.info("removed stale cache files %s", ", ".join(p.name for p in removed))
    return removed


def source_digest(fmt: str, sources: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the format and every source tensor (name, dtype, shape, bytes)."""
    h = hashlib.sha256(f"swakv-quant/{FORMAT_VERSION}/{fmt}".encode())
    for name in sorted(sources):
        t = sources[name].detach().to("cpu").contiguous()
        h.update(f"|{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(memoryview(t.view(torch.uint8).numpy()))
    return h.hexdigest()


def cache_path(cache: Path, fmt: str, digest: str) -> Path:
    return cache / f"{fmt}-{digest[:16]}.safetensors"


def load_or_quantize(
    mode: Quantization, sources: Mapping[str, torch.Tensor], cache: Path | None,
    prune: bool = False,
) -> dict[str, PackedWeights]:
    """Packed weights of `mode` for every source weight [N, K] (by linear name).

    With `cache` (a directory), reads them from the cache file when it is complete and
    matches the sources, else quantizes and writes the file, and with `prune` (the
    directory holds this model's files only) then removes the files it made stale
    (`prune_stale`). Without `cache`, quantizes.
    """
    if cache is None:
        return _quantize_all(mode, sources)
    fmt = packed_format(mode)
    digest = source_digest(fmt, sources)
    path = cache_path(cache, fmt, digest)
    expected = {name: _expected_shapes(weight_format(mode, role_of(name)), w)
                for name, w in sources.items()}
    packed = _read(path, mode, fmt, digest, expected)
    if packed is not None:
        return packed
    packed = _quantize_all(mode, sources)
    if _write(path, fmt, digest, packed) and prune:
        prune_stale(cache, path)
    return packed


def _quantize_all(mode: Quantization, sources: Mapping[str, torch.Tensor]
                  ) -> dict[str, PackedWeights]:
    return {name: quantize_weight(mode, role_of(name), w) for name, w in sources.items()}


def _expected_shapes(weight_fmt: str, w: torch.Tensor) -> dict[str, tuple[torch.dtype, tuple]]:
    n, k = w.shape
    if weight_fmt == "int4":
        g = k // INT4_GROUP_SIZE
        return {"packed": (torch.uint8, (n, k // 2)), "scales": (torch.float32, (n, g)),
                "zeros": (torch.float32, (n, g))}
    if weight_fmt == "int8g":
        return {"qweight": (torch.int8, (n, k)),
                "scales": (torch.float32, (n, k // INT8_GROUP_SIZE))}
    return {"qweight": (torch.int8, (n, k)), "scales": (torch.float32, (n,))}


def read_tensors(path: Path, meta: Mapping[str, str],
                 expected: Mapping[str, tuple[torch.dtype, tuple]]
                 ) -> dict[str, torch.Tensor] | None:
    """The tensors in the safetensors file `path` when it exists, its metadata holds
    `meta` (and this module's FORMAT_VERSION) and its tensors are exactly `expected`
    (name -> dtype, shape); else None (logged unless the file is missing)."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            found = f.metadata() or {}
            want = {"format_version": FORMAT_VERSION, **meta}
            if any(found.get(k) != v for k, v in want.items()):
                log.warning("stale cache file %s (metadata %s); rebuilding", path, found)
                return None
            if set(f.keys()) != set(expected):
                log.warning("cache file %s holds other tensors; rebuilding", path)
                return None
            tensors = {k: f.get_tensor(k) for k in expected}
    except Exception as e:  # SafetensorError, OSError, ValueError: truncated or corrupt
        log.warning("cannot read cache file %s (%s); rebuilding", path, e)
        return None
    for name, (dtype, shape) in expected.items():
        t = tensors[name]
        if t.dtype != dtype or tuple(t.shape) != shape:
            log.warning("cache file %s: %s is %s %s, expected %s %s; rebuilding",
                        path, name, t.dtype, tuple(t.shape), dtype, shape)
            return None
    return tensors


def _read(path: Path, mode: Quantization, fmt: str, digest: str,
          expected: Mapping[str, Mapping[str, tuple[torch.dtype, tuple]]]
          ) -> dict[str, PackedWeights] | None:
    """The packed weights in `path`, or None (logged) if it is unreadable or stale."""
    flat = {f"{lin}.{field}": spec for lin, fields in expected.items()
            for field, spec in fields.items()}
    tensors = read_tensors(path, {"format": fmt, "digest": digest}, flat)
    if tensors is None:
        return None
    return {lin: _packed(weight_format(mode, role_of(lin)), lin, tensors) for lin in expected}


def _packed(weight_fmt: str, lin: str, tensors: Mapping[str, torch.Tensor]) -> PackedWeights:
    if weight_fmt == "int4":
        return Int4Weights(tensors[f"{lin}.packed"], tensors[f"{lin}.scales"],
                           tensors[f"{lin}.zeros"], INT4_GROUP_SIZE)
    if weight_fmt == "int8g":
        return Int8GroupWeights(tensors[f"{lin}.qweight"], tensors[f"{lin}.scales"],
                                INT8_GROUP_SIZE)
    return Int8Weights(tensors[f"{lin}.qweight"], tensors[f"{lin}.scales"])


def _write(path: Path, fmt: str, digest: str, packed: Mapping[str, PackedWeights]) -> bool:
    return write_tensors(path, {f"{lin}.{field}": t for lin, w in packed.items()
                         for field, t in w.tensors().items()},
                  {"format": fmt, "digest": digest})


def write_tensors(path: Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]
                  ) -> bool:
    """Write `tensors` with `meta` (and FORMAT_VERSION) atomically: a temporary file in
    the same directory, then rename. Returns whether the file was written.

    A cache that cannot be written (read-only directory, full disk) is logged and
    skipped: the caller still uses its tensors from memory.
    """
    from safetensors.torch import save_file

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        os.close(fd)
        try:
            save_file({k: t.contiguous() for k, t in tensors.items()}, tmp,
                      metadata={"format_version": FORMAT_VERSION, **meta})
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        log.warning("cannot write cache file %s: %s", path, e)
        return False
    return True
