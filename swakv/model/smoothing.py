"""SmoothQuant-style smoothing of the w8a8 mode's qkv and gate/up inputs.

w8a8 quantizes each token's activations to int8 with one scale per row, so a few
input channels much larger than the rest (Gemma's normed residual has them) leave the
other channels few levels. Smoothing moves that range into the weights: for a linear
y = x W^T whose input x is an RMSNorm output x = n(h) * (1 + g),

    y = (x / s) (W * s)^T   for any s > 0 per input channel,

and x / s is the same norm with weight (1 + g) / s, so the model computes the same
function in exact arithmetic; only where rounding falls changes. Per channel j
(SmoothQuant, Xiao et al. 2023):

    s_j = max|x_j|^ALPHA / max_n |W[n, j]|^(1 - ALPHA), clamped to [S_MIN, S_MAX],

with max|x_j| over a calibration forward of the float32 model. The layer's
input_layernorm folds qkv's s (q, k and v read the same x), pre_feedforward_layernorm
folds gate/up's. `down` is not smoothed: its input is GELU(gate) * up, not a norm.

Calibration is data-free: CALIBRATION_SEQUENCES sequences of the BOS token and
CALIBRATION_TOKENS pseudo-random token ids (seed 0) from [3, vocab) (past Gemma's pad /
eos / bos), so it needs no tokenizer and no text. bench/quant_quality.py, w8a8 large
path (bf16, 32 prompts x 64 tokens): 94.87% / KL 0.0130 unsmoothed; ALPHA 0.5 96.88% /
0.0039, 0.65 97.36% / 0.0038 (calibrated on 8 English / code texts), 0.65 on random
tokens 97.17% / 0.0043. A norm-weight proxy (|1 + g| for max|x|, no forward) gave
81.0%: the residual's own outlier channels matter.

The factors depend only on the weights; they are cached beside the packed weights
(`quant_cache.quant_cache_dir`) as `smooth-<version>-<digest[:16]>.safetensors`,
keyed on every weight tensor, so a model is calibrated once.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from swakv.config import ModelSpec

ALPHA = 0.65
S_MIN, S_MAX = 1e-2, 1e2
CALIBRATION_SEQUENCES = 8
CALIBRATION_TOKENS = 63  # after BOS
FIRST_CALIBRATION_ID = 3
SMOOTH_VERSION = "1"
SMOOTH_FORMAT = f"smooth-{SMOOTH_VERSION}-a{ALPHA}"  # cache file name prefix
SMOOTHED_ROLES = {  # role -> (its input's norm, the HF weights it reads)
    "qkv": ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    "gate_up": ("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
}


def factors_from_maxima(activation_max: torch.Tensor, weights: list[torch.Tensor],
                        alpha: float = ALPHA) -> torch.Tensor:
    """fp32 s [K] for inputs with per-channel maxima [K] read by `weights` [N_i, K]."""
    weight_max = torch.stack([w.float().abs().amax(0) for w in weights]).amax(0)
    s = activation_max.float().clamp(min=1e-5) ** alpha / weight_max.clamp(min=1e-5) ** (1 - alpha)
    return s.clamp(S_MIN, S_MAX)


def smooth_weights(weights: Mapping[str, torch.Tensor], factors: Mapping[str, torch.Tensor]
                   ) -> dict[str, torch.Tensor]:
    """HF-named weights with each smoothed linear's input columns times s and its norm
    weight g replaced by (1 + g) / s - 1 (fp32); `factors` by "layers.{i}.{role}".
    The other tensors are the same objects."""
    out = dict(weights)
    for name, s in factors.items():
        _, layer, role = name.split(".")
        norm, linears = SMOOTHED_ROLES[role]
        p = f"model.layers.{layer}."
        for lin in linears:
            out[p + lin + ".weight"] = weights[p + lin + ".weight"].float() * s[None, :]
        g = weights[p + norm + ".weight"].float()
        out[p + norm + ".weight"] = (1.0 + g) / s - 1.0
    return out


def calibration_ids(spec: ModelSpec) -> list[list[int]]:
    """The calibration sequences: BOS (when the model has one) and pseudo-random ids."""
    gen = torch.Generator().manual_seed(0)
    bos = [spec.bos_token_id] if spec.bos_token_id is not None else []
    return [bos + torch.randint(FIRST_CALIBRATION_ID, spec.vocab_size, (CALIBRATION_TOKENS,),
                                generator=gen).tolist()
            for _ in range(CALIBRATION_SEQUENCES)]


class _MaxRecorder:
    """A linear that records max |x_j| of its inputs into `maxima[name]`."""

    def __init__(self, linear, name: str, maxima: dict[str, torch.Tensor]) -> None:
        self.linear, self.name, self.maxima = linear, name, maxima

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).float()
        old = self.maxima.get(self.name)
        self.maxima[self.name] = m if old is None else torch.maximum(old, m)
        return self.linear(x)


def activation_maxima(spec: ModelSpec, weights: Mapping[str, torch.Tensor]
                      ) -> dict[str, torch.Tensor]:
    """max |x_j| at every smoothed linear's input ("layers.{i}.{role}" -> [K]) over the
    calibration sequences, run one at a time through the float32 unquantized model."""
    from dataclasses import replace

    from swakv.config import KVLayout
    from swakv.engine.runner import BatchItem, ModelRunner  # the model package's user
    from swakv.memory import KVPool, ReqTable, SWAAllocator
    from swakv.model.gemma3 import Gemma3Model

    model = Gemma3Model(spec, weights, torch.float32, prepack=False)
    maxima: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(model.layers):
        model.layers[i] = replace(layer, **{
            role: _MaxRecorder(getattr(layer, role), f"layers.{i}.{role}", maxima)
            for role in SMOOTHED_ROLES})
    page = 16
    for ids in calibration_ids(spec):
        pages = -(-len(ids) // page) + 1
        alloc = SWAAllocator(pages, pages, page)
        pool = KVPool(KVLayout.from_model(spec, torch.float32), alloc)
        table = ReqTable(1, len(ids) + page)
        runner = ModelRunner(model, pool, table)
        row = table.alloc_row()
        table.write(row, 0, alloc.alloc(len(ids)))
        with torch.inference_mode():
            meta = runner.build_metadata([BatchItem(row, 0, ids)])
            model.forward(torch.tensor(ids), meta, pool)
    return maxima


def compute_factors(spec: ModelSpec, weights: Mapping[str, torch.Tensor]
                    ) -> dict[str, torch.Tensor]:
    """The smoothing factors of every smoothed linear ("layers.{i}.{role}" -> s [K])."""
    maxima = activation_maxima(spec, weights)
    factors = {}
    for name, amax in maxima.items():
        _, layer, role = name.split(".")
        linears = SMOOTHED_ROLES[role][1]
        factors[name] = factors_from_maxima(
            amax, [weights[f"model.layers.{layer}.{lin}.weight"] for lin in linears])
    return factors


def load_or_compute_factors(spec: ModelSpec, weights: Mapping[str, torch.Tensor],
                            cache: Path | None, prune: bool = False
                            ) -> dict[str, torch.Tensor]:
    """`compute_factors`, read from / written to the cache directory `cache` (None: not
    cached). A file that is unreadable or does not match is recomputed and replaced;
    with `prune` (the directory holds this model's files only) a new file's stale
    predecessors are removed (`quant_cache.prune_stale`)."""
    if cache is None:
        return compute_factors(spec, weights)
    from swakv.model.quant_cache import prune_stale, read_tensors, source_digest, write_tensors

    fmt = SMOOTH_FORMAT
    digest = source_digest(fmt, weights)
    path = cache / f"{fmt}-{digest[:16]}.safetensors"
    expected = {f"layers.{i}.{role}": (torch.float32, (spec.hidden_size,))
                for i in range(spec.num_layers) for role in SMOOTHED_ROLES}
    factors = read_tensors(path, {"format": fmt, "digest": digest}, expected)
    if factors is None:
        factors = compute_factors(spec, weights)
        if write_tensors(path, factors, {"format": fmt, "digest": digest}) and prune:
            prune_stale(cache, path)
    return factors
