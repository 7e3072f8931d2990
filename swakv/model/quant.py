"""Quantized linear layers: weight formats, kernels and the row-count dispatch.

Modes (`--quantization`, vLLM's flag name; the values name the arithmetic, as torchao
and SGLang do: `int8` / `int4` weight-only, `w8a8` for int8 weights x int8
activations, vLLM's and SGLang's name for that scheme):

    none  the model dtype's dense weights (float32 is the exact reference path)
    int8  weight-only int8, symmetric per group of INT8_GROUP_SIZE input columns:
          w ~ q * s[group], q in [-127, 127], each group's scale snapped to a GGUF
          block grid when that holds the group exactly (quant_formats.Int8GroupWeights)
    int4  weight-only int4, asymmetric per group of INT4_GROUP_SIZE input columns:
          w ~ (q - 8) * s + z, q in [0, 15] (torch's tinygemm convention), each
          group's span snapped to a source grid when that holds it exactly
          (quant_formats.Int4Weights)
    w8a8  int8 weights per output channel (w ~ q * s[n]) times int8 activations
          quantized per token on the fly (x ~ qx * sx, sx = max|x_row| / 127), int32
          accumulation, for the roles whose large batches run that kernel
          (torch._int_mm cannot apply per-group weight scales); the other roles
          (down, LM head) hold int8's grouped weights (`weight_format`). qkv's and
          gate/up's inputs are smoothed first (swakv.model.smoothing: a per-channel
          factor moved from the activations into the weights, folded into the
          norm before them; the same function in exact arithmetic)

No quantized mode is exact. In every mode the quantized weights ARE the weights: each
linear holds one set of effective weights, and the dispatch only picks the kernel
that is fastest for the number of rows in the batch (see DISPATCH). Where that is a
dense GEMM (from a handful of rows on), it runs on a model-dtype copy of the
dequantized weights, so a token's result does not depend on the batch it lands in
beyond float rounding. Activations are quantized only by the w8a8 kernel, which
`w8a8` runs for large batches (prefill chunks); its small batches run weight-only
on its per-channel int8 weights.

Quality (bench/quant_quality.py: 32 prompts x 64 tokens teacher-forced on the
float32 greedy continuation; top-1 agreement / mean KL vs float32, small-batch /
large-batch path): with float32 activations int8 99.17% / 0.0003 (per output channel,
the earlier format, 96.4% / 0.0036: one scale per 640-wide row cannot follow the
GGUF's per-32 block scales); with bf16 activations bf16 none 98.0% / 0.0007, int8
98.2 / 98.0% / 0.0009 (bf16 rounding of the activations is what stops it short of
99%), w8a8 97.8 / 97.3% / 0.002 / 0.004 (unsmoothed 97.4-97.8 / 94.9-95.3%, KL 0.013),
int4 85.2% / 0.16. The default model's
weights are already 4-8-bit GGUF values (q/k/v and gate/up Q5_0, o Q4_K, down Q4_K /
Q6_K, embedding Q8_0): int4 holds the Q4_K groups exactly (each group's span snapped
to the source grid: o alone in int4 then costs nothing, it cost 2.9 points with plain
min/max groups) but must drop a bit of every Q5_0 value and four of every Q8_0 one.
Each of q/k/v, gate/up, down and the LM head alone in int4 costs 6-9 points of
top-1 with float32 activations, and neither data-free rounding (an MSE-searched
clipping range gained under 10%) nor calibrated GPTQ recovers enough; int4 on any one
of the 18 layers alone costs 1.9-5.5 points, and groups of 8 (int8's size) still lose
9 points on every linear (bench/int4_sensitivity.py).

Memory: the dense copies are kept because every role's dispatch needs them, so
`int8` / `int4` / `w8a8` hold the packed weights in addition to what `none` holds
(linears of the default model: 768 / 671 / 768 MiB with per-channel int8, bf16 `none`
511 MiB; grouped int8 adds one fp32 scale per 32 weights, 21 MiB for the LM head);
they buy speed for small batches, not memory. The tied LM head's embedding table stays exact either way.

Kernels (in swakv.model.quant_kernels; torch ops and swakv's C++ kernels, no Python loops
over rows or groups):
- dense: oneDNN prepacked bf16 (`mkldnn._linear_pointwise`), else F.linear;
- grouped int8 weight-only: `swakv.int8_group_mm` (swakv.kernels.quant_src; AVX-512
  when the CPU has it), fp32 sums; without the C++ kernels `int8` runs dense only;
- per-channel int8 weight-only: `aten._weight_int8pack_mm` (x [M, K], q [N, K], s [N]);
- int4 weight-only: `aten._weight_int4pack_mm_for_cpu` (tinygemm layout from
  `aten._convert_weight_to_int4pack_for_cpu`; CPU only: other devices take the
  dense kernel on the dequantized weights);
- w8a8: `torch._int_mm` (int8 x int8 -> int32, VNNI on x86) with per-token and
  per-channel scales applied to the int32 result.
torchao's CPU int4 layout calls the same `_weight_int4pack_mm_for_cpu`, and its own
C++ CPU kernels need AMX (this machine has none) and a build for this torch, so
torchao adds no faster kernel here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import torch

from swakv.kernels.cpu_build import cpu_kernels_available
from swakv.model.quant_formats import (
    INT4_GROUP_SIZE,
    INT8_GROUP_SIZE,
    INT8_MAX,
    Int4Weights,
    Int8GroupWeights,
    Int8Weights,
    pack_int4,
    unpack_int4,
)
from swakv.model.quant_kernels import (
    DenseKernel,
    Int4WeightOnlyKernel,
    Int8GroupKernel,
    Int8WeightOnlyKernel,
    Int32Workspace,
    Kernel,
    W8A8Kernel,
    mkldnn_bf16,
    quantize_per_token,
)
from swakv.model.sampler import greedy_ids

__all__ = [  # formats and kernels are re-exported: callers import the whole API from here
    "INT4_GROUP_SIZE", "INT8_GROUP_SIZE", "INT8_MAX", "DenseKernel", "Int32Workspace",
    "Int4Weights", "Int4WeightOnlyKernel", "Int8GroupKernel", "Int8GroupWeights",
    "Int8WeightOnlyKernel", "Int8Weights", "Kernel", "W8A8Kernel", "mkldnn_bf16",
    "pack_int4", "quantize_per_token", "unpack_int4",
]


class Quantization(StrEnum):
    NONE = "none"
    INT8 = "int8"
    INT4 = "int4"
    W8A8 = "w8a8"


# --------------------------------------------------------------------------- dispatch

LINEAR_ROLES = ("qkv", "o", "gate_up", "down", "lm_head")


@dataclass(frozen=True)
class Dispatch:
    """Which kernel runs a linear of one role in one mode, by the batch's row count.

    `steps[i] = (min_rows, kernel)`, min_rows strictly increasing from 1: a batch of M
    rows runs the kernel of the last step with min_rows <= M. Kernel names: "dense"
    (model-dtype GEMM on the dequantized weights), "int8" (weight-only int8), "int4"
    (weight-only int4), "w8a8" (torch._int_mm on per-token int8 activations).
    """

    steps: tuple[tuple[int, str], ...]

    def __post_init__(self) -> None:
        rows = [m for m, _ in self.steps]
        if not rows or rows[0] != 1 or any(b <= a for a, b in zip(rows, rows[1:])):
            raise ValueError(f"dispatch steps must start at 1 row and increase: {self.steps}")

    def kernel_for(self, num_rows: int) -> str:
        name = self.steps[0][1]
        for min_rows, kernel in self.steps[1:]:
            if num_rows < min_rows:
                break
            name = kernel
        return name

    @property
    def kernels(self) -> tuple[str, ...]:
        return tuple(k for _, k in self.steps)


def _d(*steps: tuple[int, str]) -> Dispatch:
    return Dispatch(tuple(steps))


# Measured with bench/quant_kernels.py (Gemma 3 270M shapes, bf16 activations, 2
# threads, Xeon with AVX512-VNNI and AVX512-BF16, no AMX; fastest call, minimum over
# three runs, because other jobs share the two cores). Each switch is at the first
# row count from which the next kernel is faster at that count and at the larger ones
# measured (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024;
# the LM head, which sees one row per sequence, up to 256), with one exception the
# switches ignore: w8a8 lost to dense at 768 rows (qkv 1.61 vs 1.49 ms, gate_up 9.6 vs
# 4.0 ms) while winning at 384, 512 and 1024; with glibc's mmap threshold raised
# (MALLOC_MMAP_THRESHOLD_=256MiB) it won at 768 too (1.17 vs 1.65, 3.2 vs 4.2 ms), so
# that is page faults on its fresh multi-MB temporaries, an allocator effect. Other
# models use the switches of the same role.
# ms per call, bf16 dense / int8 / int4 / w8a8:
#   role     N x K          M=1                    M=8                   M=1024
#   qkv      1536 x 640     .023/.015/.015/.026    .033/.051/.048/.046   1.97/6.28/5.74/1.68
#   o        640 x 1024     .019/.011/.012/.023    .026/.034/.033/.053   1.27/3.85/3.78/1.16
#   gate_up  4096 x 640     .043/.032/.036/.034    .063/.131/.121/.089   5.13/16.9/15.6/4.57
#   down     640 x 2048     .027/.017/.019/.026    .039/.060/.062/.088   2.67/7.67/7.73/2.40
#   lm_head  262144 x 640   7.35/4.90/3.03/3.87    7.13/11.6/8.75/10.3   (M=64) 26.4/104/82.5/59.5
# int8g (grouped int8, the int8 mode's small-batch kernel) vs dense, ms at M = 1/2/4/8:
#   qkv .018/.021/.043/.069 vs .026/.027/.032/.037; o .017/.017/.030/.056 vs
#   .021/.021/.022/.027; gate_up .047/.062/.076/.153 vs .047/.050/.051/.071; down
#   .023/.028/.056/.141 vs .030/.030/.031/.041; lm_head 5.10/4.48/7.55/17.6 vs
#   7.40/8.57/8.40/9.31 (per-channel int8 there: 5.39/5.34/5.84/11.2).
# w8a8 with its passes fused in C++ (W8A8Kernel), re-measured on an AMD EPYC (AVX512-VNNI
# and -BF16, 2 threads; `--rows 8,...,1024 --shapes qkv,o,gate_up,down`), dense / w8a8 ms:
#   M       qkv           o             gate_up       down
#   16      .048/.042     .039/.045     .102/.097     .056/.109
#   32      .080/.061     .062/.059     .189/.149     .098/.128
#   64      .135/.087     .099/.081     .351/.247     .175/.183
#   256     .499/.376     .335/.217     1.30/.759     .665/.448
#   1024    1.95/1.11     1.27/.761     5.16/3.34     2.70/1.55
# so w8a8 wins from 16 (qkv; a tie at 8), 32 (o), 16 (gate_up) and 96 (down) rows; the
# torch passes it replaced had put those switches at 64, 256, 32 and 96.
# Weight-only kernels win only while reading the weights dominates (a few rows); the
# int8 GEMM beats oneDNN's prepacked bf16 GEMM by 25-45% from a few dozen rows on for
# the layers. Not for the LM head: even with the C++ rescale of its [M, 262144] int32
# sums, tiled like the dense LM head, it took 23.6 ms at M = 64 vs 25.5 dense, and its
# per-channel weights cost top-1 agreement that its grouped int8 keeps. The w8a8 mode does not use it for `down` although
# it is 30-40% faster there from 96 rows: down's input, GELU(gate) * up, has outlier
# channels that per-token int8 rounds worst (bench/quant_quality.py subset, KL over
# bf16 with only that role on w8a8: down +0.014, qkv +0.007, gate_up +0.006, o +0.001)
# (~20 ms of a ~330 ms 1,024-token prefill chunk). Measured and not taken (large path,
# bf16, the mode otherwise as shipped at 95.31% / 0.0129): down on w8a8 93.85% / 0.0229;
# with SmoothQuant-style smoothing folded into up's rows and down's columns (per-channel
# maxima from 8 calibration texts outside the quality prompts) alpha 0.5 93.95% / 0.018,
# 0.8 94.68% / 0.021; keeping the 32 (128) calibration-largest input channels in bf16
# 94.58% (94.48%) / 0.016; with down's weights left exact, activations alone cost it
# 94.09% (none in bf16) and 95.02% (32 in bf16).
# Output rows per prepacked tile of the LM head's dense kernel (see DenseKernel). ms
# per call, [262,144 x 640] bf16, median of 10, outputs written into a reused buffer:
#   tile rows     M=1    M=4    M=16   M=64      (whole, fresh output: 7.01 7.10 9.87 32.3)
#   16,384        7.21   7.12   9.94   25.5
#   65,536        7.19   7.04   9.94   25.6
LM_HEAD_TILE_ROWS = 16384
# The timings above are hot: one weight called again and again, from cache. A decode
# step reads each layer's weights once (the default model's layers hold ~100 MB in
# int8, three times the L3 here), so the switches below a handful of rows follow the
# cold timings (`bench/quant_kernels.py --cold --rows 1,2,3,4,6,8 --groups ""`: one
# weight per layer, evicted before each pass), ms per call at M = 1 / 2 / 3 / 4 / 6:
#   qkv      dense .048/.049/.043/.044/.048  int8 .032/.031/.033/.034/.065
#            int8k .024/.025/.034/.038/.048  int8g .026/.027/.031/.035/.053
#   o        dense .029/.031/.034/.035/.037  int8 .021/.021/.023/.024/.041
#            int8k .020/.022/.026/.030/.048  int8g .019/.020/.023/.027/.052
#   gate_up  dense .079/.089/.093/.094/.105  int8 .078/.076/.083/.086/.172
#            int8k .056/.065/.094/.089/.175  int8g .060/.073/.097/.082/.179
#   down     dense .044/.047/.050/.052/.054  int8g .033/.041/.051/.090/.134
# (int8k: swakv.int8_group_mm on the per-channel weights as one group of K,
# `Int8Weights.as_groups`). swakv's kernel streams cold weights faster than aten's at
# one or two rows. A w8a8 decode step of one sequence (`bench/profile_step.py
# --quantization w8a8 --only decode1`, old / new code alternating, two runs each):
# matmuls 4.44 / 4.33 -> 3.39 / 3.53 ms, the step 11.2 / 10.9 -> 10.0 / 10.0 ms.

DISPATCH: dict[Quantization, dict[str, Dispatch]] = {
    Quantization.INT8: {  # the layers' switches from the cold timings above
        "qkv": _d((1, "int8g"), (6, "dense")),
        "o": _d((1, "int8g"), (6, "dense")),
        "gate_up": _d((1, "int8g"), (6, "dense")),
        "down": _d((1, "int8g"), (3, "dense")),
        "lm_head": _d((1, "int8g"), (5, "dense")),
    },
    Quantization.INT4: {
        "qkv": _d((1, "int4"), (4, "dense")),
        "o": _d((1, "int4"), (8, "dense")),
        "gate_up": _d((1, "int4"), (4, "dense")),
        "down": _d((1, "int4"), (4, "dense")),
        "lm_head": _d((1, "int4"), (8, "dense")),
    },
    Quantization.W8A8: {
        # "int8g" here runs on the per-channel weights (int8k in the cold timings)
        "qkv": _d((1, "int8g"), (3, "int8"), (6, "dense"), (16, "w8a8")),
        "o": _d((1, "int8g"), (3, "int8"), (6, "dense"), (32, "w8a8")),
        "gate_up": _d((1, "int8g"), (3, "int8"), (6, "dense"), (16, "w8a8")),
        "down": _d((1, "int8g"), (3, "dense")),  # see below: w8a8 costs most there
        "lm_head": _d((1, "int8g"), (5, "dense")),
    },
}


class QuantLinear:
    """y = x @ W^T on quantized weights; the kernel is picked by the row count of x.

    x: [..., in_features] in the model dtype (leading dims are flattened into rows),
    y: [..., out_features] in the same dtype. `dispatch` may be replaced at run time
    (tests and the quality bench force one kernel with `Dispatch(((1, name),))`); it
    may only name kernels in `kernels`.
    """

    def __init__(self, kernels: dict[str, Kernel], dispatch: Dispatch,
                 out_features: int, in_features: int) -> None:
        self.kernels = kernels
        self.out_features, self.in_features = out_features, in_features
        self.dispatch = dispatch

    @property
    def dispatch(self) -> Dispatch:
        return self._dispatch

    @dispatch.setter
    def dispatch(self, dispatch: Dispatch) -> None:
        missing = set(dispatch.kernels) - set(self.kernels)
        if missing:
            raise ValueError(f"dispatch names kernels this linear lacks: {sorted(missing)}")
        self._dispatch = dispatch
        # (min_rows, kernel) pairs, resolved once: the hot path is a short scan
        self._steps = [(m, self.kernels[k]) for m, k in dispatch.steps]

    def kernel_for(self, num_rows: int) -> Kernel:
        """The kernel a batch of `num_rows` rows runs."""
        return self._kernel_for(num_rows)

    def _kernel_for(self, num_rows: int) -> Kernel:
        kernel = self._steps[0][1]
        for min_rows, k in self._steps[1:]:
            if num_rows < min_rows:
                break
            kernel = k
        return kernel

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).contiguous()
        return self._kernel_for(x2.shape[0])(x2).reshape(*lead, self.out_features)

    def argmax(self, x: torch.Tensor) -> torch.Tensor:
        """int64 [M]: the first maximum's column of each row of x [M, in] @ W^T, by the
        kernel for M rows (`DenseKernel.argmax` when that is the dense one)."""
        kernel = self._kernel_for(x.shape[0])
        if isinstance(kernel, DenseKernel):
            return kernel.argmax(x.contiguous())
        return greedy_ids(kernel(x.contiguous()))

    def into(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """x [M, in] @ W^T written into `out` [M, out] by the kernel for M rows."""
        kernel = self._kernel_for(x.shape[0])
        if isinstance(kernel, DenseKernel):
            return kernel.into(x.contiguous(), out)
        return out.copy_(kernel(x.contiguous()))


PackedWeights = Int8Weights | Int8GroupWeights | Int4Weights


def weight_format(mode: Quantization, role: str) -> str:
    """The packed format a linear of `role` holds in `mode`: "int4", "int8g" (grouped
    int8) or "int8" (per output channel: the only one torch._int_mm can rescale, so
    w8a8 uses it exactly for the roles whose dispatch runs its w8a8 kernel, and
    grouped int8, closer to the source weights, for the others)."""
    if mode is Quantization.INT4:
        return "int4"
    if mode is Quantization.INT8:
        return "int8g"
    if mode is Quantization.W8A8:
        return "int8" if "w8a8" in DISPATCH[mode][role].kernels else "int8g"
    raise ValueError(f"mode {mode} has no packed weights")


def role_of(name: str) -> str:
    """The role (one of LINEAR_ROLES) of a linear named "lm_head" / "layers.{i}.{role}"."""
    return name.rsplit(".", 1)[-1]


def _tile_rows(role: str) -> int | None:
    return LM_HEAD_TILE_ROWS if role == "lm_head" else None


def quantize_weight(mode: Quantization, role: str, w: torch.Tensor) -> PackedWeights:
    """The packed weights of a linear of `role` in `mode` for w [N, K]."""
    fmt = weight_format(mode, role)
    if fmt == "int4":
        return Int4Weights.quantize(w)
    if fmt == "int8g":
        return Int8GroupWeights.quantize(w)
    return Int8Weights.quantize(w)


def make_quant_linear(mode: Quantization, role: str, packed: PackedWeights,
                      dtype: torch.dtype, prepack: bool = True,
                      workspace: Int32Workspace | None = None) -> QuantLinear:
    """The dispatching linear of `role` (one of LINEAR_ROLES) for `mode`.

    Only the kernels its dispatch names are built: the dense one holds a model-dtype
    copy of the dequantized weights. Off the CPU every row count runs dense (the
    weight-only CPU kernels do not exist there), and so does a plan naming "int8g"
    when swakv's C++ kernels are unavailable.
    """
    plan = DISPATCH[mode][role]
    if isinstance(packed, Int4Weights):
        n, k = packed.packed.shape[0], 2 * packed.packed.shape[1]
        device = packed.packed.device
    else:
        (n, k), device = packed.qweight.shape, packed.qweight.device
    if device.type != "cpu" or ("int8g" in plan.kernels and not cpu_kernels_available()):
        plan = Dispatch(((1, "dense"),))
    makers: dict[str, Callable[[], Kernel]] = {
        "dense": lambda: DenseKernel(packed.dequantize(dtype), dtype, prepack, _tile_rows(role)),
        "int8": lambda: Int8WeightOnlyKernel(packed, dtype),  # type: ignore[arg-type]
        "int8g": lambda: Int8GroupKernel(  # per-channel weights as one group per row
            packed.as_groups(dtype) if isinstance(packed, Int8Weights) else packed,  # type: ignore[arg-type]
            dtype),
        "int4": lambda: Int4WeightOnlyKernel(packed, dtype),  # type: ignore[arg-type]
        "w8a8": lambda: W8A8Kernel(packed, dtype, workspace),  # type: ignore[arg-type]
    }
    return QuantLinear({name: makers[name]() for name in set(plan.kernels)}, plan, n, k)


def build_linears(
    sources: Mapping[str, torch.Tensor],
    mode: Quantization,
    dtype: torch.dtype,
    prepack: bool = True,
    weights_dir: Path | None = None,
) -> dict[str, DenseKernel | QuantLinear]:
    """One linear per source weight [out, in], by name ("lm_head", "layers.3.qkv"):
    DenseKernel for `none`, else the QuantLinear of its role (the name's last part)
    on packed weights read from, or written to, the cache of `weights_dir` (None: no
    disk cache)."""
    if mode is Quantization.NONE:
        return {name: DenseKernel(w, dtype, prepack, _tile_rows(role_of(name)))
                for name, w in sources.items()}
    from swakv.model.quant_cache import cache_for, load_or_quantize

    packed = load_or_quantize(mode, sources, *cache_for(weights_dir))
    workspace = Int32Workspace()  # the model's linears run one at a time
    return {
        name: make_quant_linear(mode, role_of(name), p, dtype, prepack, workspace)
        for name, p in packed.items()
    }
