"""Packed weight formats of the quantized modes (see swakv.model.quant for the modes).

Each format is a frozen set of plain tensors on the weights' device, built once from
the float weights by `quantize` (and cached on disk by swakv.model.quant_cache), with
`dequantize` giving the effective weights the kernels compute with.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

INT4_GROUP_SIZE = 32  # input columns per int4 scale/zero (GGUF Q4_K sub-blocks are 32 wide)
INT8_GROUP_SIZE = 32  # input columns per grouped-int8 scale (GGUF blocks are 32 wide)
INT8_MAX = 127
# Grouped int8 tries these scales, amax / j, and keeps per group the one with the least
# largest error: 127 is the plain grid; the others are the grids of GGUF's 8/6/5/4-bit
# blocks (Q8_0: |q| <= 127; Q6_K: q in [-32, 31]; Q5_0: [-16, 15]; Q4_0: [-8, 7]), on
# which such a group is then held exactly.
INT8_GRID_DIVISORS = (127, 64, 63, 32, 31, 16, 15, 8, 7)
# int4 groups map their [min, max] onto q = 0..j for one of these spans (see Int4Weights)
INT4_GRID_SPANS = tuple(range(15, 0, -1))
_QUANTIZE_ROWS = 8192  # rows quantized at once (bounds the fp32 temporaries)


@dataclass(frozen=True)
class Int8Weights:
    """Symmetric per-output-channel int8: w[n, k] ~ qweight[n, k] * scales[n].

    qweight int8 [N, K] in [-127, 127]; scales fp32 [N] (> 0; 1.0 for all-zero rows).
    """

    qweight: torch.Tensor
    scales: torch.Tensor

    @classmethod
    def quantize(cls, w: torch.Tensor) -> Int8Weights:
        w = w.float()
        amax = w.abs().amax(dim=1)
        scales = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
        q = torch.round(w / scales[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
        return cls(q.contiguous(), scales.contiguous())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The effective weights [N, K], with the scales rounded to `dtype` as the
        kernels use them."""
        s = self.scales.to(dtype).float()
        return (self.qweight.float() * s[:, None]).to(dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"qweight": self.qweight, "scales": self.scales}

    def as_groups(self, dtype: torch.dtype) -> Int8GroupWeights:
        """The same effective weights as one group of K per row (scales rounded to
        `dtype` as `dequantize` rounds them), for the grouped int8 kernel; shares
        qweight. Needs K a multiple of 16 (the kernel's step)."""
        k = self.qweight.shape[1]
        if k % 16:
            raise ValueError(f"in_features {k} is not a multiple of 16")
        scales = self.scales.to(dtype).float().reshape(-1, 1).contiguous()
        return Int8GroupWeights(self.qweight, scales, k)


@dataclass(frozen=True)
class Int8GroupWeights:
    """Symmetric int8 with one scale per group of `group_size` input columns:
    w[n, k] ~ qweight[n, k] * scales[n, k // group_size].

    qweight int8 [N, K] in [-127, 127]; scales fp32 [N, K / group_size] (> 0; 1.0 for an
    all-zero group). Per group the scale is amax / j for the j of INT8_GRID_DIVISORS
    with the least largest error (the first on ties): a group already on a GGUF block's
    grid (Q8_0, Q6_K, Q5_0, Q4_0) is kept exactly; any other group is within half a
    step, amax / 254, of its value.
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    group_size: int

    @classmethod
    def quantize(cls, w: torch.Tensor, group_size: int = INT8_GROUP_SIZE) -> Int8GroupWeights:
        n, k = w.shape
        if k % group_size or group_size % 16:
            raise ValueError(f"in_features {k} is not a multiple of int8 group {group_size}"
                             " (itself a multiple of 16)")
        qs, ss = [], []
        for lo in range(0, n, _QUANTIZE_ROWS):
            q, s = _quantize_groups(w[lo : lo + _QUANTIZE_ROWS].float(), group_size)
            qs.append(q)
            ss.append(s)
        return cls(torch.cat(qs).contiguous(), torch.cat(ss).contiguous(), group_size)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The effective weights [N, K] (products in fp32, then rounded to `dtype`)."""
        n, k = self.qweight.shape
        g = self.qweight.float().view(n, k // self.group_size, self.group_size)
        return (g * self.scales[..., None]).view(n, k).to(dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"qweight": self.qweight, "scales": self.scales}


def _quantize_groups(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 w [n, k] -> (int8 q [n, k], fp32 scales [n, k / group]) per Int8GroupWeights."""
    n, k = w.shape
    g = w.view(n, k // group_size, group_size)
    amax = g.abs().amax(dim=-1)

    def grid(j: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = torch.where(amax > 0, amax / j, torch.ones_like(amax))
        q = torch.round(g / s[..., None]).clamp_(-INT8_MAX, INT8_MAX)
        return q, s, (q * s[..., None] - g).abs().amax(dim=-1)

    q, s = _least_error(grid(j) for j in INT8_GRID_DIVISORS)
    return q.view(n, k).to(torch.int8), s


def _least_error(grids: Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group, the (q [n, G, group], scale [n, G]) of the first of `grids` (q, scale,
    largest error [n, G]) with the least largest error."""
    best_q, best_s, best_err = next(grids)
    for q, s, err in grids:
        better = err < best_err
        best_q = torch.where(better[..., None], q, best_q)
        best_s = torch.where(better, s, best_s)
        best_err = torch.minimum(err, best_err)
    return best_q, best_s


@dataclass(frozen=True)
class Int4Weights:
    """Asymmetric groupwise int4: w[n, k] ~ (q[n, k] - 8) * scales[n, g] + zeros[n, g],
    g = k // group_size, q in [0, 15].

    `packed` uint8 [N, K / 2] holds two values per byte: column 2j in the low nibble,
    2j + 1 in the high nibble (a device-independent format; kernels repack it).
    scales, zeros fp32 [N, K / group_size]. Quantization maps each group's min to q 0
    and its max to q = j for the j in INT4_GRID_SPANS with the least largest error
    (the first, 15, on ties): a group on a 16-level grid (GGUF Q4_K) that spans only
    q_min..q_max of it is kept exactly with j = q_max - q_min, up to the rounding of
    its scale and zero; any other group is within half a step, (max - min) / 30.
    """

    packed: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group_size: int

    @classmethod
    def quantize(cls, w: torch.Tensor, group_size: int = INT4_GROUP_SIZE) -> Int4Weights:
        n, k = w.shape
        if k % group_size or group_size % 2:
            raise ValueError(f"in_features {k} is not a multiple of int4 group {group_size}")
        qs, ss, zs = [], [], []
        for r0 in range(0, n, _QUANTIZE_ROWS):
            q, scales, lo = quantize_int4_groups(w[r0 : r0 + _QUANTIZE_ROWS].float(), group_size)
            qs.append(pack_int4(q))
            ss.append(scales)
            zs.append(lo + 8 * scales)
        return cls(torch.cat(qs).contiguous(), torch.cat(ss).contiguous(),
                   torch.cat(zs).contiguous(), group_size)

    def unpack(self) -> torch.Tensor:
        """q uint8 [N, K] in [0, 15]."""
        return unpack_int4(self.packed)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The effective weights [N, K], scales and zeros rounded to `dtype` as the
        kernels use them."""
        n, k = self.packed.shape[0], 2 * self.packed.shape[1]
        q = self.unpack().float().reshape(n, k // self.group_size, self.group_size)
        s = self.scales.to(dtype).float()[..., None]
        z = self.zeros.to(dtype).float()[..., None]
        return ((q - 8) * s + z).reshape(n, k).to(dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"packed": self.packed, "scales": self.scales, "zeros": self.zeros}


def quantize_int4_groups(w: torch.Tensor, group_size: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 w [n, k] -> (q uint8 [n, k] in [0, 15], scales, mins fp32 [n, k / group])
    per Int4Weights: w ~ q * scale + min."""
    n, k = w.shape
    g = w.view(n, k // group_size, group_size)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)

    def grid(span: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = torch.where(hi > lo, (hi - lo) / span, torch.ones_like(lo))
        q = torch.round((g - lo[..., None]) / s[..., None]).clamp_(0, span)
        return q, s, (q * s[..., None] + lo[..., None] - g).abs().amax(dim=-1)

    q, s = _least_error(grid(span) for span in INT4_GRID_SPANS)
    return q.view(n, k).to(torch.uint8), s, lo


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] values in [0, 15] -> uint8 [N, K / 2], low nibble = even column."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: uint8 [N, K / 2] -> uint8 [N, K]."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


