"""swakv.rms_norm_bf16, swakv.add_rms_norm_bf16 and swakv.gelu_tanh_mul_bf16 against the
ops they fuse (the torch paths of gemma3.rms_norm, gemma3.add_rms_norm and
gemma3.gelu_mul)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from swakv.kernels.cpu_build import cpu_kernels_available
from swakv.model.gemma3 import add_rms_norm, gelu_mul, rms_norm


@pytest.fixture(autouse=True, scope="module")
def _kernels() -> None:
    assert cpu_kernels_available(), "the C++ kernels must build on this machine"


def _reference(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """fp32 RMSNorm times w, as float64 (the value both paths round to bf16)."""
    xd = x.double()
    return xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps) * w.double()


@pytest.mark.parametrize("case", ["2d", "3d_per_head", "3d_shared", "strided_heads", "empty"])
def test_rms_norm_bf16_is_one_rounding_of_the_fp32_norm(case: str) -> None:
    gen = torch.Generator().manual_seed(len(case))
    eps = 1e-6
    if case == "2d":
        x, w = torch.randn(37, 640, generator=gen), torch.rand(640, generator=gen) + 0.5
    elif case == "3d_per_head":
        x, w = torch.randn(9, 5, 256, generator=gen), torch.rand(5, 256, generator=gen) + 0.5
    elif case == "3d_shared":
        x, w = torch.randn(9, 5, 256, generator=gen), torch.rand(1, 256, generator=gen) + 0.5
    elif case == "strided_heads":  # q and k heads of a fused qkv row: [T, 5 of 7, D]
        x = torch.randn(11, 7, 256, generator=gen)[:, :5]
        w = torch.rand(5, 256, generator=gen) + 0.5
    else:
        x, w = torch.randn(0, 640), torch.rand(640) + 0.5
    xb = x.to(torch.bfloat16)
    out = torch.ops.swakv.rms_norm_bf16(xb, w, eps)
    assert out.dtype == torch.bfloat16 and out.shape == xb.shape and out.is_contiguous()
    ref = _reference(xb, w, eps)
    # one rounding to bf16 of a value within fp32 error of the exact norm: <= 1 bf16 ulp
    assert bool(((out.double() - ref).abs() <= ref.abs() * 2**-8 + 1e-30).all())
    torch_path = (F.rms_norm(xb.float(), (xb.shape[-1],), eps=eps) * w).to(torch.bfloat16)
    if xb.numel():
        assert (out != torch_path).float().mean().item() < 1e-3  # ulp ties only
    assert torch.equal(rms_norm(xb, w, eps), out)  # gemma3 routes bf16 here


def test_rms_norm_bf16_rejects_bad_inputs() -> None:
    op = torch.ops.swakv.rms_norm_bf16
    x = torch.zeros(2, 3, 8, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="x bf16"):
        op(x.float(), torch.ones(8), 1e-6)
    with pytest.raises(RuntimeError, match="weight float32"):
        op(x, torch.ones(2, 8), 1e-6)
    with pytest.raises(RuntimeError, match="weight float32"):
        op(x, torch.ones(8, dtype=torch.bfloat16), 1e-6)


def test_float32_keeps_the_torch_path() -> None:
    """The exact reference path: float32 never goes through the bf16 kernel."""
    x, w = torch.randn(4, 640), torch.rand(640) + 0.5
    expected = F.rms_norm(x, (640,), eps=1e-6) * w
    assert torch.equal(rms_norm(x, w, 1e-6), expected)


@pytest.mark.parametrize("rows", [0, 1, 5, 64])
def test_gelu_tanh_mul_bf16_within_one_ulp_of_the_rounded_ops(rows: int) -> None:
    """GELU(tanh)(gate) rounded to bf16, times up, rounded: each output within one bf16
    ulp (plus a tiny absolute slack for results near zero) of the float64 value of
    those roundings; row-strided input (a slice of a wider buffer) too."""
    gen = torch.Generator().manual_seed(rows)
    wide = (torch.randn(rows, 2 * 96 + 8, generator=gen) * 4).to(torch.bfloat16)
    gate_up = wide[:, : 2 * 96]
    out = torch.ops.swakv.gelu_tanh_mul_bf16(gate_up)
    assert out.shape == (rows, 96) and out.dtype == torch.bfloat16
    gate, up = gate_up.chunk(2, dim=-1)
    ref = F.gelu(gate.double(), approximate="tanh").to(torch.bfloat16).double() * up.double()
    assert bool(((out.double() - ref).abs() <= ref.abs() * 2**-8 + 1e-5).all())
    assert torch.equal(gelu_mul(gate_up), out)  # gemma3 routes bf16 here
    with pytest.raises(RuntimeError, match="gate_up bf16"):
        torch.ops.swakv.gelu_tanh_mul_bf16(gate_up.float())


def test_gelu_mul_float32_keeps_the_torch_path() -> None:
    gu = torch.randn(3, 16)
    gate, up = gu.chunk(2, dim=-1)
    assert torch.equal(gelu_mul(gu), F.gelu(gate, approximate="tanh") * up)


@pytest.mark.parametrize("shape, per_head", [((37, 5, 256), True), ((3, 1, 64), False),
                                             ((0, 5, 32), True)])
def test_rms_norm_rope_bf16_is_bit_identical_to_norm_then_rope(shape: tuple[int, int, int],
                                                               per_head: bool) -> None:
    """The fused q/k norm + RoPE against rms_norm_bf16 followed by apply_rope on bf16
    tensors (every product and sum rounded), on a strided view like gemma3's q/k slice."""
    from swakv.model.rope import apply_rope, rope_cos_sin

    gen = torch.Generator().manual_seed(shape[0])
    t, h, d = shape
    qkv = (torch.randn(t, h + 2, d, generator=gen) * 3).to(torch.bfloat16)
    x = qkv[:, :h]  # rows (h + 2) * d apart
    w = torch.rand((h, d) if per_head else (d,), generator=gen) + 0.5
    freq = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    cos, sin = rope_cos_sin(freq, torch.arange(100, 100 + t), torch.bfloat16)
    fused = torch.ops.swakv.rms_norm_rope_bf16(x, w, 1e-6, cos, sin)
    two_step = apply_rope(torch.ops.swakv.rms_norm_bf16(x, w, 1e-6), cos, sin)
    assert fused.dtype == torch.bfloat16 and fused.shape == shape
    assert torch.equal(fused, two_step)


def test_rms_norm_rope_bf16_rejects_mismatched_tables() -> None:
    x = torch.zeros(4, 2, 8, dtype=torch.bfloat16)
    w = torch.ones(8)
    cos = torch.ones(4, 4, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="cos, sin"):
        torch.ops.swakv.rms_norm_rope_bf16(x, w, 1e-6, cos, torch.ones(3, 4, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="cos, sin"):
        torch.ops.swakv.rms_norm_rope_bf16(x, w, 1e-6, cos.float(), cos.float())


@pytest.mark.parametrize("rows", [0, 1, 37, 130])
def test_add_rms_norm_bf16_is_bit_identical_to_add_then_norm(rows: int) -> None:
    """The residual step and the next norm in one pass against rms_norm_bf16, a bf16
    add and rms_norm_bf16 again (gemma3's two-step path), with y a row-strided view;
    float32 keeps the torch ops."""
    gen = torch.Generator().manual_seed(rows)
    h = (torch.randn(rows, 640, generator=gen) * 8).to(torch.bfloat16)
    y = (torch.randn(rows, 700, generator=gen) * 3).to(torch.bfloat16)[:, :640]
    wy, wx = torch.rand(640, generator=gen) + 0.5, torch.rand(640, generator=gen) + 0.5
    h_out, x_out = torch.ops.swakv.add_rms_norm_bf16(h, y, wy, wx, 1e-6)
    h_ref = h + torch.ops.swakv.rms_norm_bf16(y, wy, 1e-6)
    assert torch.equal(h_out, h_ref)
    assert torch.equal(x_out, torch.ops.swakv.rms_norm_bf16(h_ref, wx, 1e-6))
    h32, y32 = h.float(), y.float()
    got = add_rms_norm(h32, y32, wy, wx, 1e-6)
    want = h32 + rms_norm(y32, wy, 1e-6)
    assert torch.equal(got[0], want) and torch.equal(got[1], rms_norm(want, wx, 1e-6))
    with pytest.raises(RuntimeError, match="like h"):
        torch.ops.swakv.add_rms_norm_bf16(h, y[:, :320], wy, wx, 1e-6)
    with pytest.raises(RuntimeError, match=r"weight float32 \[D\]"):
        torch.ops.swakv.add_rms_norm_bf16(h, y, torch.ones(2, 640), wx, 1e-6)
