"""The kernels of the quantized linears (see swakv.model.quant for the modes and the
row-count dispatch that picks among them): each maps x [M, K] to y [M, N] in x's dtype
on one weight format."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from swakv.kernels.cpu_build import cpu_kernels_available
from swakv.model.quant_formats import INT8_MAX, Int4Weights, Int8GroupWeights, Int8Weights
from swakv.model.sampler import greedy_ids


def mkldnn_bf16() -> bool:
    """Whether oneDNN can run bf16 matmuls on this CPU (prepacked weights pay off)."""
    return bool(
        torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


# --------------------------------------------------------------------------- kernels

Kernel = Callable[[torch.Tensor], torch.Tensor]  # x [M, K] -> y [M, N] in x's dtype


class DenseKernel:
    """y = x @ W^T for W [out, in] held in the model dtype.

    bf16 weights are prepacked once into oneDNN's blocked layout when the CPU has bf16
    support (`prepack`): results are bit-identical to F.linear and 1.3-2x faster for
    decode-sized batches. Other dtypes and devices stay plain (MKL for fp32, like
    transformers).

    `tile_rows` (the LM head): prepacked weights are held as tiles of that many output
    rows, so `into` can write a caller's buffer tile by tile. oneDNN's linear has no
    out= form, and a fresh [64, 262,144] bf16 output (33.5 MB, above glibc's largest
    mmap threshold) is faulted in page by page on every call: 32.3 ms per batch-64 LM
    head whole vs 25.5 ms tiled into a reused buffer (7.0 vs 7.2 ms at one row;
    see `LM_HEAD_TILE_ROWS`).
    """

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype, prepack: bool = True,
                 tile_rows: int | None = None) -> None:
        w = weight.to(dtype).contiguous()
        self.out_features, self.in_features = w.shape
        self._packed: list[tuple[int, int, torch.Tensor]] = []  # (row_lo, row_hi, tile)
        self._plain: torch.Tensor | None = w
        if prepack and dtype == torch.bfloat16 and w.device.type == "cpu" and mkldnn_bf16():
            step = tile_rows or self.out_features
            self._packed = [
                (lo, min(lo + step, self.out_features),
                 torch.ops.mkldnn._reorder_linear_weight(w[lo : lo + step].contiguous()))
                for lo in range(0, self.out_features, step)
            ]
            self._plain = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if len(self._packed) == 1:
            return torch.ops.mkldnn._linear_pointwise(x, self._packed[0][2], None, "none", [], "")
        if self._packed:
            return self.into(x, x.new_empty(x.shape[0], self.out_features))
        return F.linear(x, self._plain)  # type: ignore[arg-type]

    def argmax(self, x: torch.Tensor) -> torch.Tensor:
        """int64 [M]: per row of x [M, in], the column of the first maximum of x @ W^T,
        exactly `argmax` of `self(x)`. With bf16 prepacked tiles each tile's output goes
        to `swakv.argmax_update_bf16` while it is in cache: no [M, out] output is
        written or scanned again (the greedy LM head)."""
        if not self._packed or x.dtype != torch.bfloat16 or not cpu_kernels_available():
            return greedy_ids(self(x))
        best_value = torch.full((x.shape[0],), float("-inf"), device=x.device)
        best_index = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
        for lo, _, tile in self._packed:
            y = torch.ops.mkldnn._linear_pointwise(x, tile, None, "none", [], "")
            torch.ops.swakv.argmax_update_bf16(y, best_value, best_index, lo)
        return best_index

    def into(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Write x [M, in] @ W^T into `out` [M, out] (x's dtype) and return it."""
        if not self._packed:
            return torch.mm(x, self._plain.t(), out=out)  # type: ignore[union-attr]
        for lo, hi, tile in self._packed:
            out[:, lo:hi] = torch.ops.mkldnn._linear_pointwise(x, tile, None, "none", [], "")
        return out


class Int8WeightOnlyKernel:
    """`aten._weight_int8pack_mm`: x (bf16/fp32) times int8 weights, scales in x's dtype."""

    def __init__(self, w: Int8Weights, dtype: torch.dtype) -> None:
        self.qweight = _aligned(w.qweight)
        self.scales = _aligned(w.scales.to(dtype))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(_aligned(x), self.qweight, self.scales)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """t itself when its data is _ALIGN-byte aligned, else a fresh (aligned) copy.

    torch 2.13's CPU `_weight_int8pack_mm` uses aligned vector loads: it faulted on
    weights read from the safetensors cache (whose tensors sit at any offset in the
    file) and on a 16- but not 32-byte-aligned x (tests/unit/test_quant.py)."""
    return t if t.data_ptr() % _ALIGN == 0 else t.clone()


_ALIGN = 64  # bytes: torch's CPU allocator aligns every fresh tensor to this


class Int8GroupKernel:
    """`swakv.int8_group_mm` (C++, swakv.kernels): x (bf16/fp32) times grouped int8
    weights, fp32 sums; needs the CPU kernels (`cpu_kernels_available()`)."""

    def __init__(self, w: Int8GroupWeights, dtype: torch.dtype) -> None:
        self.qweight, self.scales, self.group_size = w.qweight, w.scales, w.group_size

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.swakv.int8_group_mm(x, self.qweight, self.scales, self.group_size)


class Int4WeightOnlyKernel:
    """`aten._weight_int4pack_mm_for_cpu` on the tinygemm layout (CPU only)."""

    def __init__(self, w: Int4Weights, dtype: torch.dtype) -> None:
        q = w.unpack().to(torch.int32)
        self.group_size = w.group_size
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        # [K / group, N, 2]: scale and zero of group g for output n
        self.scales_zeros = torch.stack((w.scales, w.zeros), dim=-1).transpose(0, 1)
        self.scales_zeros = self.scales_zeros.contiguous().to(dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, self.packed, self.group_size, self.scales_zeros
        )


class Int32Workspace:
    """A reusable int32 buffer for the [M, N] sums of `torch._int_mm`, shared by the w8a8
    kernels of one model: they run one after another and each turns its sums into a
    fresh output before returning, so one buffer serves them all.

    Why: a fresh output of gate/up at 2,048 rows (33.5 MB) is above glibc's largest mmap
    threshold (32 MiB), so each call mapped it anew and faulted it in page by page (a
    2,048-token chunk took longer per token than a 1,024-token one). The buffer grows to
    the largest M x N seen and stays.
    """

    def __init__(self) -> None:
        self._buf = torch.empty(0, dtype=torch.int32)

    def take(self, rows: int, cols: int, device: torch.device) -> torch.Tensor:
        """An int32 [rows, cols] view of the buffer (its contents are undefined)."""
        n = rows * cols
        if self._buf.numel() < n or self._buf.device != device:
            self._buf = torch.empty(n, dtype=torch.int32, device=device)
        return self._buf[:n].view(rows, cols)


class W8A8Kernel:
    """Dynamic per-token int8 activations x per-channel int8 weights on `torch._int_mm`.

    For row m: sx[m] = max_k |x[m, k]| / 127 (1 for an all-zero row),
    qx = round(x / sx) in [-127, 127], y[m, n] = (sum_k qx[m, k] q[n, k]) sx[m] s[n]
    with int32 accumulation (exact: |sum| <= 127 * 127 * K < 2^31 for K < 133,000).
    On the CPU the two passes around the GEMM are swakv's C++ ops, bit-identical to the
    torch expressions of the fallback: one read of x, one of the int32 sums. ms at M =
    512, torch -> C++: quantize [512, 640] 0.101 -> 0.019, [512, 2048] 0.256 -> 0.054;
    rescale [512, 4096] 0.275 -> 0.118 (the gate_up GEMM itself: ~1.5).
    """

    def __init__(self, w: Int8Weights, dtype: torch.dtype,
                 workspace: Int32Workspace | None = None) -> None:
        self.qweight_t = _aligned(w.qweight).t()  # [K, N] view: _int_mm takes it as is
        self.scales = w.scales.to(dtype).float().contiguous()
        self.fused = w.qweight.device.type == "cpu" and cpu_kernels_available()
        self.workspace = workspace or Int32Workspace()

    def _sums(self, qx: torch.Tensor) -> torch.Tensor:
        """int32 [M, N] = qx @ q^T, in the workspace."""
        out = self.workspace.take(qx.shape[0], self.qweight_t.shape[1], qx.device)
        return torch._int_mm(qx, self.qweight_t, out=out)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        qx, sx = torch.ops.swakv.quantize_rows_int8(x) if self.fused else quantize_per_token(x)
        acc = self._sums(qx)
        if self.fused:
            return torch.ops.swakv.rescale_int32(acc, sx, self.scales, x.dtype)
        return (acc.float().mul_(sx).mul_(self.scales)).to(x.dtype)

    def gelu_mul(self, x: torch.Tensor) -> torch.Tensor:
        """GELU(tanh)(gate) * up of this gate/up linear's output for bf16 x [M, K], with
        the rescale and the GELU in one pass over the int32 sums
        (`swakv.rescale_gelu_mul_bf16`: bit-identical to rescaling to bf16, then
        `swakv.gelu_tanh_mul_bf16`; at M = 1,024, gate/up of the default model: 0.66
        vs 0.84 ms). Needs `fused` and a bf16 x."""
        qx, sx = torch.ops.swakv.quantize_rows_int8(x)
        return torch.ops.swakv.rescale_gelu_mul_bf16(self._sums(qx), sx, self.scales)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (int8 [M, K], fp32 scales [M, 1]) with x ~ q * scale per row.

    |x / scale| <= 127 by construction (scale = max|x_row| / 127), so rounding never
    leaves [-127, 127]; the only temporaries are |x| in x's dtype and one fp32 [M, K].
    """
    amax = x.abs().amax(dim=1, keepdim=True).float()
    sx = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    return torch.div(x, sx).round_().to(torch.int8), sx
