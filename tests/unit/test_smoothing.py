"""w8a8's smoothing (swakv.model.smoothing): the fold keeps the model's function, the
calibration maxima match an independent computation, the factors follow the formula
and are cached."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from swakv.model import smoothing
from swakv.model.gemma3 import Gemma3Model
from swakv.model.loader import load_model_dir
from swakv.model.quant_cache import quant_cache_dir
from swakv.model.smoothing import (
    SMOOTHED_ROLES,
    calibration_ids,
    compute_factors,
    factors_from_maxima,
    load_or_compute_factors,
    smooth_weights,
)
from swakv.model.testing import make_tiny_gemma3_dir, prompt_logits


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    path = make_tiny_gemma3_dir(tmp_path_factory.mktemp("smooth") / "m", num_layers=2,
                                window=8, sliding_pattern=2, seed=11)
    return load_model_dir(path)


@pytest.fixture(scope="module")
def factors(tiny) -> dict[str, torch.Tensor]:
    return compute_factors(tiny.spec, tiny.weights)


def test_factors_follow_the_formula() -> None:
    amax = torch.tensor([4.0, 1.0, 0.0, 1e6])
    w = [torch.tensor([[1.0, -4.0, 1.0, 1.0]]), torch.tensor([[-0.5, 2.0, 0.0, 1.0]])]
    s = factors_from_maxima(amax, w, alpha=0.5)
    # sqrt(4) / sqrt(1); sqrt(1) / sqrt(4); sqrt(1e-5) clamped up to 0.01; 1e3 clamped to 100
    assert s.tolist() == pytest.approx([2.0, 0.5, 0.01, 100.0])


def test_smoothing_keeps_the_float32_function(tiny, factors) -> None:
    """Columns times s and norm weights (1 + g) / s: the same logits up to fp32
    rounding, while folding s into the linears alone (no norm) changes them."""
    spread = torch.cat(list(factors.values()))
    assert spread.max() / spread.min() > 2  # the fold moves real range around
    ids = calibration_ids(tiny.spec)[0][:20]
    exact = prompt_logits(Gemma3Model(tiny.spec, tiny.weights, torch.float32), ids)
    smoothed = smooth_weights(tiny.weights, factors)
    got = prompt_logits(Gemma3Model(tiny.spec, smoothed, torch.float32), ids)
    assert (got - exact).abs().max() <= 1e-4 * exact.abs().max()
    norms_kept = {k: (tiny.weights[k] if "layernorm" in k else v) for k, v in smoothed.items()}
    broken = prompt_logits(Gemma3Model(tiny.spec, norms_kept, torch.float32), ids)
    assert (broken - exact).abs().max() > 1e-2 * exact.abs().max()


def test_calibration_maxima_match_an_independent_first_layer(tiny) -> None:
    """Layer 0's qkv input is RMSNorm(embed * sqrt(hidden)) * (1 + g): its per-channel
    max over the calibration tokens, computed here with plain torch."""
    maxima = smoothing.activation_maxima(tiny.spec, tiny.weights)
    assert set(maxima) == {f"layers.{i}.{r}" for i in range(tiny.spec.num_layers)
                           for r in SMOOTHED_ROLES}
    ids = torch.tensor([t for seq in calibration_ids(tiny.spec) for t in seq])
    h = F.embedding(ids, tiny.weights["model.embed_tokens.weight"].float())
    h = h * math.sqrt(tiny.spec.hidden_size)
    x = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + tiny.spec.rms_norm_eps)
    x = x * (1.0 + tiny.weights["model.layers.0.input_layernorm.weight"].float())
    assert torch.allclose(maxima["layers.0.qkv"], x.abs().amax(0), rtol=1e-5, atol=1e-6)


def test_calibration_is_deterministic_and_in_vocab(tiny) -> None:
    seqs = calibration_ids(tiny.spec)
    assert seqs == calibration_ids(tiny.spec)
    assert len(seqs) == smoothing.CALIBRATION_SEQUENCES
    for seq in seqs:
        assert seq[0] == tiny.spec.bos_token_id
        assert all(smoothing.FIRST_CALIBRATION_ID <= t < tiny.spec.vocab_size for t in seq[1:])


def test_w8a8_model_folds_the_factors_into_its_norms(tiny, factors) -> None:
    model = Gemma3Model(tiny.spec, tiny.weights, torch.float32, quantization="w8a8")
    g = tiny.weights["model.layers.1.pre_feedforward_layernorm.weight"].float()
    assert torch.allclose(model.layers[1].pre_ff_norm, (1.0 + g) / factors["layers.1.gate_up"],
                          rtol=1e-6)
    g = tiny.weights["model.layers.0.input_layernorm.weight"].float()
    assert torch.allclose(model.layers[0].input_norm, (1.0 + g) / factors["layers.0.qkv"],
                          rtol=1e-6)
    none = Gemma3Model(tiny.spec, tiny.weights, torch.float32)
    assert torch.equal(none.layers[0].input_norm, 1.0 + g)  # other modes are not smoothed


def test_factors_are_cached_and_a_bad_file_is_recomputed(
        tiny, factors, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("SWAKV_CACHE_DIR", str(tmp_path))
    cache = quant_cache_dir(tiny.path)
    first = load_or_compute_factors(tiny.spec, tiny.weights, cache)
    (path,) = cache.iterdir()
    assert path.name.startswith("smooth-")

    def no_calibration(*_args):
        raise AssertionError("calibrated again although the cache file is good")

    monkeypatch.setattr(smoothing, "compute_factors", no_calibration)
    again = load_or_compute_factors(tiny.spec, tiny.weights, cache)
    assert again.keys() == factors.keys()
    assert all(torch.equal(again[k], first[k]) and torch.equal(first[k], factors[k])
               for k in factors)
    monkeypatch.setattr(smoothing, "compute_factors", compute_factors)
    path.write_bytes(path.read_bytes()[:50])  # truncated
    with caplog.at_level(logging.WARNING, logger="swakv.model"):
        rebuilt = load_or_compute_factors(tiny.spec, tiny.weights, cache)
    assert "cannot read cache file" in caplog.text
    assert all(torch.equal(rebuilt[k], factors[k]) for k in factors)
    changed = dict(tiny.weights)
    changed["model.norm.weight"] = changed["model.norm.weight"] + 1.0  # any weight: new key
    load_or_compute_factors(tiny.spec, changed, cache)
    assert len(list(cache.iterdir())) == 2
