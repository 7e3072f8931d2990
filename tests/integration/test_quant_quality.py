"""Quantized modes on the real Gemma 3 270M stay close to float32 (loose CI bounds).

A smaller version of bench/quant_quality.py (same code): 6 of its prompts (2 short,
2 medium, 2 beyond the 512-token window) x 32 teacher-forced tokens of the float32
greedy continuation; every kernel of every mode is forced in turn. The bounds are
looser than the bench's targets (int8: top-1 >= 99%, KL <= 0.01; int4 / w8a8: 95%,
0.05) so that only a broken kernel or packing fails CI, not noise of a small set.
The packed weights are cached in a temporary SWAKV_CACHE_DIR, never the user's.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from swakv.model.loader import load_model_dir, resolve_model
from swakv.model.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

BOUNDS = {"int8": (0.97, 0.03), "int4": (0.90, 0.1), "w8a8": (0.90, 0.1)}
EXPECTED_KERNELS = {"int8": {"int8", "dense"}, "int4": {"int4", "dense"},
                    "w8a8": {"int8", "dense", "w8a8"}}
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
    for mode, (min_top1, max_kl) in BOUNDS.items():
        mine = {s.kernel: s for s in scores if s.mode == mode}
        assert set(mine) == EXPECTED_KERNELS[mode]
        for kernel, s in mine.items():
            assert s.positions == len(prompts) * NEW_TOKENS
            assert s.top1 >= min_top1, f"{mode}/{kernel}: top-1 {s.top1:.3f}"
            assert s.kl_mean <= max_kl, f"{mode}/{kernel}: mean KL {s.kl_mean:.4f}"
    assert len(list((tmp_path / "quant").iterdir())) == 2  # int8 (shared with w8a8), int4
