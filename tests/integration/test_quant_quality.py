"""Quantized modes on the real Gemma 3 270M stay close to float32 (loose CI bounds).

A smaller version of bench/quant_quality.py (same code): 6 of its prompts (2 short,
2 medium, 2 beyond the 512-token window) x 32 teacher-forced tokens of the float32
greedy continuation; each mode runs with every linear forced to its small-batch
kernel, then to its large-batch kernel. The bounds sit well below what a correct
build measured on this set (top-1 / mean KL: int8 0.958 / 0.0010 small, 0.969 / 0.0010
large; w8a8 0.958 / 0.0027 small, 0.953 / 0.0055 large; int4 0.84 / 0.20) and far above
a broken kernel or packing (top-1 near 0, KL of several nats). w8a8's KL bound also
catches a build without its smoothing (large path 0.901 / 0.0151 then). Top-1 is the
looser of the two: bf16 rounding alone already loses 2-4 points of agreement with
float32 here, and int4 cannot reach the bench's targets on this model, whose weights
are already 4-6-bit GGUF values (see swakv/model/quant.py). The packed weights go to a temporary SWAKV_CACHE_DIR.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from swakv.model.loader import load_model_dir, resolve_model
from swakv.model.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

BOUNDS = {"int8": (0.90, 0.02), "int4": (0.70, 0.4), "w8a8": (0.88, 0.012)}  # top-1, KL
SMALL_KERNELS = {"int8": {"int8g"}, "int4": {"int4"}, "w8a8": {"int8g"}}
LARGE_KERNEL = {"int8": "dense", "int4": "dense", "w8a8": "w8a8"}
NEW_TOKENS = 32


def _bench_module():
    path = Path(__file__).resolve().parents[2] / "bench" / "quant_quality.py"
    spec = importlib.util.spec_from_file_location("quant_quality_bench", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_quantized_modes_track_float32(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bench = _bench_module()
    model_dir = resolve_model(None)
    loaded = load_model_dir(model_dir)
    monkeypatch.setenv("SWAKV_CACHE_DIR", str(tmp_path))  # after resolving the model
    tok = Tokenizer.from_dir(model_dir, extra_eos_ids=loaded.spec.eos_token_ids)
    texts = bench.fixed_prompts()
    chosen = [texts[i] for i in (0, 3, 8, 13, 24, 29)]
    prompts = [tok.encode(t, add_bos=True) for t in chosen]
    assert sum(len(p) > 512 for p in prompts) == 2
    scores, tokens = bench.evaluate(loaded, prompts, NEW_TOKENS, list(BOUNDS))
    assert all(len(t) == NEW_TOKENS for t in tokens)
    table = "\n".join(f"{s.mode} {s.path} ({s.kernels}): top-1 {s.top1:.4f}, "
                      f"mean KL {s.kl_mean:.5f}" for s in scores)
    failures = []
    for mode, (min_top1, max_kl) in BOUNDS.items():
        mine = {s.path: s for s in scores if s.mode == mode}
        assert set(mine) == {"small", "large"}
        assert set(mine["small"].kernels.split("+")) == SMALL_KERNELS[mode]
        assert LARGE_KERNEL[mode] in mine["large"].kernels.split("+")
        for path, s in mine.items():
            assert s.positions == len(prompts) * NEW_TOKENS
            if s.top1 < min_top1 or s.kl_mean > max_kl:
                failures.append(f"{mode}/{path}")
    assert not failures, f"out of bounds: {failures}\n{table}"
    # int8-g32, w8a8-g32, int4s-g32 and w8a8's smoothing factors
    assert len(list((tmp_path / "quant").iterdir())) == 4
