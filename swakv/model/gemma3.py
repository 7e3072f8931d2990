"""Gemma 3 text model over the hybrid KV pools (no transformers at run time).

Numerics follow Hugging Face `Gemma3ForCausalLM` (transformers 5.x):
- embeddings scaled by sqrt(hidden) cast to the weight dtype;
- RMSNorm `x * rsqrt(mean(x^2) + eps) * (1 + w)` computed in fp32, cast back;
- per-head q/k RMSNorm, then RoPE with the layer kind's base (and linear factor);
- attention scale `query_pre_attn_scalar ** -0.5`, optional logit softcap (applied
  when the spec sets it; transformers' Gemma 3 ignores `attn_logit_softcapping`,
  which is null in every Gemma 3 checkpoint);
- sandwich norms around attention and the GELU-tanh gated MLP;
- tied LM head (unless `lm_head.weight` is given), optional final logit softcap.

The activation/matmul dtype is the constructor's `dtype` (fp32: exact against HF
fp32; bf16: fast path). Norm weights and RoPE frequencies stay fp32. q/k/v and
gate/up projections are fused into one matmul each.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F

from swakv.config import AttentionSpec, ModelSpec
from swakv.kernels.cpu_build import cpu_kernels_available
from swakv.memory.kv_pool import KVPool
from swakv.model.attention import AttentionMetadata, attend
from swakv.model.quant import (
    DenseKernel,
    Quantization,
    QuantLinear,
    W8A8Kernel,
    build_linears,
    mkldnn_bf16,
)
from swakv.model.quant_cache import cache_for
from swakv.model.rope import RopeKey, apply_rope, inv_freq, rope_cos_sin
from swakv.model.sampler import greedy_ids
from swakv.model.smoothing import load_or_compute_factors, smooth_weights


def rms_norm(x: torch.Tensor, weight_plus_one: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma RMSNorm over the last dim, in fp32, then cast back to x's dtype.

    `weight_plus_one` is fp32 (1 + w), of shape [dim] or broadcastable to x. F.rms_norm
    without weight computes HF's `x * rsqrt(mean(x^2) + eps)` with the same bits; that
    path is kept for float32 (the exact reference). bf16 CPU tensors take swakv's fused
    kernel (`swakv.rms_norm_bf16`: the same fp32 arithmetic in one pass instead of four
    ops, which dominate at small batches; its fp32 sum may round differently by an ulp).
    """
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and _fused_elementwise():
        return torch.ops.swakv.rms_norm_bf16(x, weight_plus_one, eps)
    return (F.rms_norm(x.float(), (x.shape[-1],), eps=eps) * weight_plus_one).to(x.dtype)


def add_rms_norm(h: torch.Tensor, y: torch.Tensor, weight_y: torch.Tensor,
                 weight_x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual step and the next norm: `h + rms_norm(y, weight_y)` and its
    `rms_norm(., weight_x)`, for h, y [T, hidden]; one pass per row for bf16 CPU tensors
    (`swakv.add_rms_norm_bf16`, the same roundings)."""
    if h.dtype == torch.bfloat16 and h.device.type == "cpu" and _fused_elementwise():
        return torch.ops.swakv.add_rms_norm_bf16(h, y, weight_y, weight_x, eps)
    h = h + rms_norm(y, weight_y, eps)
    return h, rms_norm(h, weight_x, eps)


def rms_norm_rope(x: torch.Tensor, weight_plus_one: torch.Tensor, eps: float,
                  cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`apply_rope(rms_norm(x, weight_plus_one, eps), cos, sin)` for x [T, heads, head_dim]:
    one pass (`swakv.rms_norm_rope_bf16`, the same roundings) for bf16 CPU tensors."""
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and _fused_elementwise():
        return torch.ops.swakv.rms_norm_rope_bf16(x, weight_plus_one, eps, cos, sin)
    return apply_rope(rms_norm(x, weight_plus_one, eps), cos, sin)


def gelu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """GELU(tanh)(gate) * up for gate_up [T, 2 * intermediate] (gate columns first).

    bf16 CPU tensors take swakv's fused kernel (`swakv.gelu_tanh_mul_bf16`: the same
    two roundings, within one bf16 ulp of them, in one pass); float32 stays on torch."""
    if gate_up.dtype == torch.bfloat16 and gate_up.device.type == "cpu" and _fused_elementwise():
        return torch.ops.swakv.gelu_tanh_mul_bf16(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def gate_up_gelu(gate_up: DenseKernel | QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """`gelu_mul(gate_up(x))` for x [T, hidden]; a w8a8 kernel with fused passes takes
    the bf16 product in one epilogue over its int32 sums (`W8A8Kernel.gelu_mul`, the
    same bits)."""
    if isinstance(gate_up, QuantLinear) and x.dtype == torch.bfloat16 and _fused_elementwise():
        kernel = gate_up.kernel_for(x.shape[0])
        if isinstance(kernel, W8A8Kernel) and kernel.fused:
            return kernel.gelu_mul(x)
    return gelu_mul(gate_up(x))


@cache
def _fused_elementwise() -> bool:
    """Whether bf16 norms and GELU * up use swakv's C++ kernels (SWAKV_DISABLE_FUSED=1:
    torch ops, for A/B measurements)."""
    return cpu_kernels_available() and not os.environ.get("SWAKV_DISABLE_FUSED")


# Dense y = x @ W^T in the model dtype (the `none` path): bf16 weights are prepacked
# for oneDNN, bit-identical to F.linear. Quantized modes use swakv.model.quant's
# QuantLinear (row-count dispatch between weight-only, dense and int8 kernels).
Linear = DenseKernel
_mkldnn_bf16 = mkldnn_bf16


@dataclass(frozen=True)
class _Layer:
    """One decoder layer's weights in run-time layout.

    `qkv`: [(heads + 2 * kv_heads) * head_dim, hidden] (rows q, then k, then v);
    `gate_up`: [2 * intermediate, hidden] (rows gate, then up). Norms are fp32 (1 + w);
    `qk_norm` [heads + kv_heads, head_dim] stacks q_norm for each query head, then
    k_norm for each KV head, so q and k are normed (and rotated) in one call.
    """

    attn: AttentionSpec
    qkv: DenseKernel | QuantLinear
    o: DenseKernel | QuantLinear
    gate_up: DenseKernel | QuantLinear
    down: DenseKernel | QuantLinear
    input_norm: torch.Tensor
    post_attn_norm: torch.Tensor
    pre_ff_norm: torch.Tensor
    post_ff_norm: torch.Tensor
    qk_norm: torch.Tensor
    rope: RopeKey


class Gemma3Model:
    """Gemma 3 causal LM built from a ModelSpec and HF-named weights.

    `forward(input_ids [T], meta, kv_pool)` returns final hidden states [T, hidden]
    (before the final norm); `compute_logits(hidden [N, hidden])` returns fp32
    logits [N, vocab].
    """

    def __init__(
        self,
        spec: ModelSpec,
        weights: Mapping[str, torch.Tensor],
        dtype: torch.dtype = torch.float32,
        prepack: bool = True,
        quantization: Quantization | str = Quantization.NONE,
        weights_dir: Path | None = None,
    ) -> None:
        """`quantization` (see swakv.model.quant) applies to every projection and the
        LM head; the embedding lookup always reads exact `dtype` rows. Packed weights
        are cached on disk beside the model in `weights_dir` (None: not cached)."""
        if spec.query_pre_attn_scalar is None:
            raise ValueError("Gemma 3 needs query_pre_attn_scalar")
        self.spec = spec
        self.dtype = dtype
        self.quantization = Quantization(quantization)
        self.eps = spec.rms_norm_eps
        self.num_heads = spec.num_heads
        self.scale = float(spec.query_pre_attn_scalar) ** -0.5
        self.attn_softcap = spec.attn_logit_softcap
        self.final_softcap = spec.final_logit_softcap
        if self.quantization is Quantization.W8A8:  # see swakv.model.smoothing
            weights = smooth_weights(
                weights, load_or_compute_factors(spec, weights, *cache_for(weights_dir)))

        def norm(name: str) -> torch.Tensor:
            return 1.0 + weights[name].float()

        self.embed = weights["model.embed_tokens.weight"].to(dtype).contiguous()
        tied = spec.tie_word_embeddings or "lm_head.weight" not in weights
        # source weights [out, in] of every linear, by name "lm_head" / "layers.{i}.{role}"
        sources: dict[str, torch.Tensor] = {
            "lm_head": weights["model.embed_tokens.weight" if tied else "lm_head.weight"]
        }
        for i in range(spec.num_layers):
            p = f"model.layers.{i}."
            sources |= {
                f"layers.{i}.qkv": torch.cat(
                    [weights[p + f"self_attn.{n}_proj.weight"] for n in "qkv"]),
                f"layers.{i}.o": weights[p + "self_attn.o_proj.weight"],
                f"layers.{i}.gate_up": torch.cat(
                    [weights[p + "mlp.gate_proj.weight"], weights[p + "mlp.up_proj.weight"]]),
                f"layers.{i}.down": weights[p + "mlp.down_proj.weight"],
            }
        self.linears = build_linears(sources, self.quantization, dtype, prepack, weights_dir)
        self.lm_head = self.linears["lm_head"]
        # HF: torch.tensor(sqrt(hidden)) (fp32) cast to the weight dtype
        self.embed_scale = torch.tensor(spec.hidden_size**0.5).to(dtype)
        self.final_norm = norm("model.norm.weight")
        self.layers: list[_Layer] = []
        for i, attn in enumerate(spec.layers):
            p = f"model.layers.{i}."
            self.layers.append(
                _Layer(
                    attn=attn,
                    qkv=self.linears[f"layers.{i}.qkv"],
                    o=self.linears[f"layers.{i}.o"],
                    gate_up=self.linears[f"layers.{i}.gate_up"],
                    down=self.linears[f"layers.{i}.down"],
                    input_norm=norm(p + "input_layernorm.weight"),
                    post_attn_norm=norm(p + "post_attention_layernorm.weight"),
                    pre_ff_norm=norm(p + "pre_feedforward_layernorm.weight"),
                    post_ff_norm=norm(p + "post_feedforward_layernorm.weight"),
                    qk_norm=torch.cat(
                        [
                            norm(p + "self_attn.q_norm.weight").expand(spec.num_heads, -1),
                            norm(p + "self_attn.k_norm.weight").expand(attn.num_kv_heads, -1),
                        ]
                    ),
                    rope=RopeKey.of(attn),
                )
            )
        self._inv_freq = {k: inv_freq(k) for k in {layer.rope for layer in self.layers}}

    @property
    def vocab_size(self) -> int:
        return self.spec.vocab_size

    def forward(
        self, input_ids: torch.Tensor, meta: AttentionMetadata, kv_pool: KVPool
    ) -> torch.Tensor:
        """Run all layers on the flat batch `input_ids` [T]; returns [T, hidden].

        Writes every layer's K/V for the batch's positions into `kv_pool` (slots from
        `meta`) before reading keys back, so a token sees itself.
        """
        eps = self.eps
        heads = self.num_heads
        num_tokens = int(input_ids.numel())
        h = F.embedding(input_ids, self.embed) * self.embed_scale
        rope = {
            k: rope_cos_sin(f, meta.positions, self.dtype) for k, f in self._inv_freq.items()
        }
        x = rms_norm(h, self.layers[0].input_norm, eps)  # each layer's input, normed
        for layer_id, layer in enumerate(self.layers):
            attn = layer.attn
            kv_heads, dim = attn.num_kv_heads, attn.head_dim
            plan = meta.sliding if attn.is_sliding else meta.full
            assert plan is not None, "batch metadata lacks a plan for sliding layers"
            qkv = layer.qkv(x).view(num_tokens, heads + 2 * kv_heads, dim)
            qk = rms_norm_rope(qkv[:, : heads + kv_heads], layer.qk_norm, eps, *rope[layer.rope])
            q, k, v = qk[:, :heads], qk[:, heads:], qkv[:, heads + kv_heads :]
            a = attend(layer_id, q, k, v, plan, kv_pool, self.scale, self.attn_softcap)
            h, x = add_rms_norm(h, layer.o(a), layer.post_attn_norm, layer.pre_ff_norm, eps)
            m = layer.down(gate_up_gelu(layer.gate_up, x))
            if layer_id + 1 < len(self.layers):
                next_norm = self.layers[layer_id + 1].input_norm
                h, x = add_rms_norm(h, m, layer.post_ff_norm, next_norm, eps)
            else:
                h = h + rms_norm(m, layer.post_ff_norm, eps)
        return h

    def greedy_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """int64 [N]: the first maximum of `compute_logits(hidden)` per row, without the
        [N, vocab] logits where the LM head can (`argmax` of DenseKernel / QuantLinear:
        the same kernel, so the same values). A final softcap is monotonic but may merge
        nearly equal logits into ties, so models with one take the logits."""
        if self.final_softcap is not None:
            return greedy_ids(self.compute_logits(hidden))
        return self.lm_head.argmax(rms_norm(hidden, self.final_norm, self.eps))

    def compute_logits(self, hidden: torch.Tensor, fp32: bool = True,
                       out: torch.Tensor | None = None) -> torch.Tensor:
        """Final norm, LM head and optional softcap: [N, hidden] -> [N, vocab], fp32, or
        with `fp32=False` in the model dtype when no softcap applies (the greedy path
        needs no [N, vocab] conversion). `out` ([N, vocab], model dtype) receives the
        LM head's output; it is what is returned when no conversion follows."""
        x = rms_norm(hidden, self.final_norm, self.eps)
        logits = self.lm_head(x) if out is None else self.lm_head.into(x, out)
        if self.final_softcap is not None:
            logits = logits.float()
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits.float() if fp32 else logits
