"""Quantized linears: packing, kernels against a dequantized reference, dispatch by row
count, and the on-disk cache of packed weights."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

from swakv.config import QUANTIZATION_MODES, EngineConfig
from swakv.kernels.cpu_build import cpu_kernels_available
from swakv.model import quant_cache
from swakv.model.gemma3 import Gemma3Model
from swakv.model.loader import load_model_dir
from swakv.model.quant import (
    DISPATCH,
    INT4_GROUP_SIZE,
    INT8_GROUP_SIZE,
    LINEAR_ROLES,
    LM_HEAD_TILE_ROWS,
    DenseKernel,
    Dispatch,
    Int4WeightOnlyKernel,
    Int4Weights,
    Int8GroupKernel,
    Int8GroupWeights,
    Int8WeightOnlyKernel,
    Int8Weights,
    Int32Workspace,
    Quantization,
    QuantLinear,
    W8A8Kernel,
    make_quant_linear,
    pack_int4,
    quantize_per_token,
    quantize_weight,
    unpack_int4,
    weight_format,
)
from swakv.model.quant_cache import (
    cache_path,
    load_or_quantize,
    model_owns_cache,
    packed_format,
    quant_cache_dir,
    source_digest,
)
from swakv.model.smoothing import ALPHA, SMOOTH_FORMAT, SMOOTH_VERSION
from swakv.model.testing import make_tiny_gemma3_dir, prompt_logits

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True, scope="module")
def _kernels() -> None:
    """int8's grouped kernel is one of swakv's C++ kernels, which must build here."""
    assert cpu_kernels_available(), "the C++ kernels must build on this machine"


def _rand(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


# ------------------------------------------------------------------------- packing


def test_pack_int4_nibble_order() -> None:
    q = torch.tensor([[1, 2, 3, 4], [15, 0, 0, 15]], dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.tolist() == [[0x21, 0x43], [0x0F, 0xF0]]
    assert torch.equal(unpack_int4(packed), q)


def test_pack_unpack_int4_round_trip() -> None:
    q = torch.randint(0, 16, (37, 96), generator=torch.Generator().manual_seed(3))
    assert torch.equal(unpack_int4(pack_int4(q)), q.to(torch.uint8))


def test_int8_quantize_recovers_values_on_its_grid() -> None:
    q = torch.randint(-127, 128, (8, 64), generator=torch.Generator().manual_seed(1))
    q[:, 0] = 127  # every row reaches the grid's end, so max|w| / 127 is the step
    steps = torch.tensor([0.5, 0.25, 2.0, 1.0, 0.125, 4.0, 0.0625, 8.0])
    w = q.float() * steps[:, None]
    packed = Int8Weights.quantize(w)
    assert torch.equal(packed.qweight, q.to(torch.int8))
    assert torch.equal(packed.scales, steps)
    assert torch.equal(packed.dequantize(), w)


def test_int8_quantize_zero_row_and_error_bound() -> None:
    w = _rand(16, 80, seed=2)
    w[3] = 0
    packed = Int8Weights.quantize(w)
    assert packed.scales[3].item() == 1.0 and not packed.qweight[3].any()
    assert int(packed.qweight.abs().max()) == 127
    err = (packed.dequantize() - w).abs()
    assert bool((err <= packed.scales[:, None] / 2 + 1e-7).all())


@pytest.mark.parametrize("levels", [127, 32, 16, 8])  # Q8_0, Q6_K, Q5_0, Q4_0 blocks
def test_int8_group_quantize_keeps_gguf_block_grids_exactly(levels: int) -> None:
    """Each group of 32 on a block grid d * q, q in [-levels, levels - 1] (GGUF's
    symmetric blocks; Q8_0 uses [-127, 127]), with its own d, round-trips exactly."""
    n, k, g = 6, 4 * INT8_GROUP_SIZE, INT8_GROUP_SIZE
    gen = torch.Generator().manual_seed(20 + levels)
    hi = levels if levels == 127 else levels - 1
    q = torch.randint(-levels, hi + 1, (n, k), generator=gen)
    q[:, ::g] = -levels  # every group reaches the grid's end
    d = (torch.rand(n, k // g, generator=gen) * 0.1 + 1e-3).half().float()  # GGUF: fp16 d
    w = (q.float().view(n, k // g, g) * d[..., None]).view(n, k)
    packed = Int8GroupWeights.quantize(w)
    assert packed.scales.shape == (n, k // g)
    assert torch.equal(packed.dequantize(), w)


def test_int8_group_quantize_error_bound_zero_group_and_bad_group() -> None:
    w = _rand(16, 96, seed=21)
    w[2, 32:64] = 0
    packed = Int8GroupWeights.quantize(w)
    assert packed.scales[2, 1].item() == 1.0 and not packed.qweight[2, 32:64].any()
    amax = w.view(16, 3, 32).abs().amax(-1)
    err = (packed.dequantize() - w).abs().view(16, 3, 32).amax(-1)
    assert bool((err <= amax / 254 + 1e-7).all())  # never worse than the plain grid
    assert int(packed.qweight.abs().max()) <= 127
    with pytest.raises(ValueError, match="multiple of int8 group"):
        Int8GroupWeights.quantize(_rand(4, 48))


def test_int4_quantize_keeps_a_16_level_grid_exactly() -> None:
    """Groups whose values lie on a 16-level grid from their min to their max (GGUF
    Q4_K's layout) round-trip exactly."""
    n, k = 4, 2 * INT4_GROUP_SIZE
    q = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(4))
    q[:, 0], q[:, 1] = 0, 15  # both groups of each row span the whole grid
    q[:, INT4_GROUP_SIZE], q[:, INT4_GROUP_SIZE + 1] = 0, 15
    step = torch.tensor([0.5, 0.25, 1.0, 2.0])[:, None]
    offset = torch.tensor([-3.0, 1.0, -0.5, 0.0])[:, None]
    w = q.float() * step + offset
    packed = Int4Weights.quantize(w)
    assert torch.equal(packed.unpack(), q.to(torch.uint8))
    assert torch.allclose(packed.dequantize(), w, atol=1e-6, rtol=0)
    assert torch.equal(packed.scales, step.expand(n, 2))
    assert torch.equal(packed.zeros, (offset + 8 * step).expand(n, 2))


def test_int4_groups_on_a_narrower_grid_round_trip_exactly() -> None:
    """A group that uses only levels q_min..q_max of a 16-level grid (a GGUF Q4_K
    sub-block that does not reach both ends) is held exactly: its [min, max] maps onto
    q = 0..(q_max - q_min), not onto a finer 0..15 grid that misses its values."""
    n, k = 3, 2 * INT4_GROUP_SIZE
    span = torch.tensor([11, 6, 1])[:, None]  # levels used per row: 0..span
    q = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(6)) % (span + 1)
    q[:, 0], q[:, 1] = 0, span[:, 0]
    q[:, INT4_GROUP_SIZE], q[:, INT4_GROUP_SIZE + 1] = 0, span[:, 0]
    step = torch.tensor([0.375, 0.0625, 3.0])[:, None]
    w = (q + 2).float() * step - 1.0  # levels 2..2 + span of a grid starting at -1
    packed = Int4Weights.quantize(w)
    assert torch.equal(packed.dequantize(), w)
    ratio = step / packed.scales  # the chosen grid is the source's or a refinement of it
    assert torch.equal(ratio, ratio.round())
    # a min/max mapping onto 0..15 would leave most of these values between levels
    plain = (w.view(n, 2, -1) - w.view(n, 2, -1).amin(-1, keepdim=True)) / (
        (w.view(n, 2, -1).amax(-1) - w.view(n, 2, -1).amin(-1)) / 15)[..., None]
    assert not torch.equal(plain, plain.round())


def test_int4_quantize_error_bound_and_bad_group() -> None:
    w = _rand(24, 128, seed=5)
    packed = Int4Weights.quantize(w)
    assert packed.packed.shape == (24, 64) and packed.scales.shape == (24, 128 // 32)
    err = (packed.dequantize() - w).abs().reshape(24, 4, 32)
    assert bool((err <= packed.scales[..., None] / 2 + 1e-6).all())
    with pytest.raises(ValueError, match="multiple of int4 group"):
        Int4Weights.quantize(_rand(4, 48), group_size=32)


def test_quantize_per_token_exact_example() -> None:
    x = torch.tensor([[1.27, -0.635, 0.0, 0.01], [0.0, 0.0, 0.0, 0.0]])
    q, s = quantize_per_token(x)
    assert q.dtype == torch.int8 and s.shape == (2, 1)
    assert q.tolist() == [[127, -64, 0, 1], [0, 0, 0, 0]]  # -63.5 rounds half to even
    assert torch.allclose(s, torch.tensor([[0.01], [1.0]]))


# ------------------------------------------------------------------------- kernels


def _reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (x.double() @ w.double().T).float()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_weight_only_kernels_match_dequantized_reference(dtype: torch.dtype, rows: int) -> None:
    w = _rand(96, 128, seed=6, scale=0.05)
    x = _rand(rows, 128, seed=7).to(dtype)
    # fp32: accumulation-order error only; bf16: output rounding (2^-8 relative)
    tol = 1e-5 if dtype == torch.float32 else 8e-3
    i8, i4, g8 = Int8Weights.quantize(w), Int4Weights.quantize(w), Int8GroupWeights.quantize(w)
    for kernel, ref_w in [
        (Int8WeightOnlyKernel(i8, dtype), i8.dequantize(dtype)),
        (Int8GroupKernel(g8, dtype), g8.dequantize(torch.float32)),
        (Int8GroupKernel(i8.as_groups(dtype), dtype), i8.dequantize(dtype)),
        (Int4WeightOnlyKernel(i4, dtype), i4.dequantize(dtype)),
        (DenseKernel(i8.dequantize(dtype), dtype), i8.dequantize(dtype)),
    ]:
        y = kernel(x)
        ref = _reference(x, ref_w)
        assert y.dtype == dtype and y.shape == (rows, 96)
        assert (y.float() - ref).abs().max().item() <= tol * ref.abs().max().item()


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_channel_int8_as_groups_holds_the_same_weights(dtype: torch.dtype) -> None:
    """One group of K per row, scales rounded to the model dtype as `dequantize` rounds
    them: the grouped kernel then computes with exactly the per-channel effective
    weights, and shares their int8 values."""
    i8 = Int8Weights.quantize(_rand(48, 160, seed=30, scale=0.05))
    g = i8.as_groups(dtype)
    assert g.group_size == 160 and g.scales.shape == (48, 1) and g.scales.dtype == torch.float32
    assert g.qweight.data_ptr() == i8.qweight.data_ptr()
    assert torch.equal(g.dequantize(dtype), i8.dequantize(dtype))
    with pytest.raises(ValueError, match="multiple of 16"):
        Int8Weights.quantize(_rand(4, 40)).as_groups(dtype)


@pytest.mark.parametrize("offset", [1, 8, 16, 32])
def test_weight_only_kernels_take_unaligned_rows(offset: int) -> None:
    """x starting `offset` bf16 elements into a buffer (a row slice, say): torch's
    _weight_int8pack_mm faults on 16-byte-aligned x unless the kernel realigns it."""
    w = _rand(640, 1024, seed=24, scale=0.05)
    buf = _rand(3 * 1024 + 64, seed=25).to(torch.bfloat16)
    x = buf[offset : offset + 3 * 1024].view(3, 1024)
    for packed, kernel_type in [(Int8Weights.quantize(w), Int8WeightOnlyKernel),
                                (Int8GroupWeights.quantize(w), Int8GroupKernel),
                                (Int4Weights.quantize(w), Int4WeightOnlyKernel)]:
        y = kernel_type(packed, torch.bfloat16)(x)  # type: ignore[arg-type]
        ref = _reference(x, packed.dequantize(torch.bfloat16))
        assert (y.float() - ref).abs().max().item() <= 8e-3 * ref.abs().max().item()


@pytest.mark.parametrize("offset", [1, 8, 16, 32])
def test_int8_weight_only_kernel_takes_unaligned_weights(offset: int) -> None:
    """Weights at any offset (as the safetensors cache file returns them) work."""
    w = Int8Weights.quantize(_rand(640, 1024, seed=26, scale=0.05))
    qbuf = torch.zeros(640 * 1024 + 64, dtype=torch.int8)
    qbuf[offset : offset + 640 * 1024] = w.qweight.view(-1)
    moved = Int8Weights(qbuf[offset : offset + 640 * 1024].view(640, 1024), w.scales)
    x = _rand(7, 1024, seed=27).to(torch.bfloat16)
    y = Int8WeightOnlyKernel(moved, torch.bfloat16)(x)
    ref = _reference(x, w.dequantize(torch.bfloat16))
    assert (y.float() - ref).abs().max().item() <= 8e-3 * ref.abs().max().item()


@pytest.mark.parametrize("rows", [0, 1, 2, 7, 8, 9, 17])
def test_int8_group_mm_every_row_block(rows: int) -> None:
    """The C++ kernel's row blocks (1-8, then 8 at a time) and column split against a
    float64 reference, for groups of 32 and 64 and strided rows of x."""
    for group in (32, 64):
        w = _rand(600, 256, seed=22, scale=0.05)
        g8 = Int8GroupWeights.quantize(w, group_size=group)
        x = _rand(rows, 512, seed=23)[:, :256]  # rows 512 apart
        y = torch.ops.swakv.int8_group_mm(x, g8.qweight, g8.scales, group)
        ref = _reference(x, g8.dequantize())
        assert y.shape == (rows, 600) and y.dtype == torch.float32
        assert torch.allclose(y.double(), ref.double(), rtol=0, atol=1e-5)


def test_int8_group_mm_rejects_bad_shapes() -> None:
    q = torch.zeros(8, 64, dtype=torch.int8)
    s = torch.ones(8, 2)
    x = torch.zeros(1, 64)
    op = torch.ops.swakv.int8_group_mm
    with pytest.raises(RuntimeError, match="matches x"):
        op(torch.zeros(1, 32), q, s, 32)
    with pytest.raises(RuntimeError, match="group a multiple of 16"):
        op(x, q, s, 24)
    with pytest.raises(RuntimeError, match="scales float32"):
        op(x, q, torch.ones(8, 3), 32)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        op(x.half(), q, s, 32)
    with pytest.raises(RuntimeError, match="qweight int8"):
        op(x, q.float(), s, 32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_w8a8_kernel_matches_integer_reference(dtype: torch.dtype, rows: int) -> None:
    w = _rand(96, 128, seed=8, scale=0.05)
    x = _rand(rows, 128, seed=9).to(dtype)
    i8 = Int8Weights.quantize(w)
    y = W8A8Kernel(i8, dtype)(x)
    qx, sx = quantize_per_token(x)
    acc = qx.long() @ i8.qweight.long().T  # exact integer products
    ref = acc.double() * sx.double() * i8.scales.to(dtype).double()
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    assert y.dtype == dtype
    assert (y.double() - ref).abs().max().item() <= tol * ref.abs().max().item()
    # and it stays close to the unquantized product (activation error ~ 1/254 per row)
    exact = _reference(x.float(), w)
    assert (y.float() - exact).abs().max().item() <= 0.03 * exact.abs().max().item()


@pytest.mark.parametrize("dtype", DTYPES)
def test_w8a8_kernel_torch_fallback_equals_the_fused_passes(dtype: torch.dtype) -> None:
    """Without swakv's C++ ops (another device, no compiler) the kernel's torch
    expressions give the same bits."""
    i8 = Int8Weights.quantize(_rand(96, 128, seed=13, scale=0.05))
    x = _rand(33, 128, seed=14).to(dtype)
    fused = W8A8Kernel(i8, dtype)
    plain = W8A8Kernel(i8, dtype)
    plain.fused = False
    assert fused.fused
    assert torch.equal(fused(x), plain(x))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, cols", [(1, 640), (3, 48), (40, 2048)])
def test_fused_w8a8_passes_are_bit_identical_to_torch(dtype: torch.dtype, rows: int,
                                                      cols: int) -> None:
    """quantize_rows_int8 / rescale_int32 against the torch expressions they replace,
    with exact halves (round half to even) and an all-zero row."""
    x = _rand(rows, cols, seed=10, scale=3.0).to(dtype)
    x[0, :6] = torch.tensor([0.5, -0.5, 1.5, 2.5, -2.5, 127.0])  # row scale 1: ties
    if rows > 1:
        x[1] = 0
    q, sx = torch.ops.swakv.quantize_rows_int8(x)
    q_ref, sx_ref = quantize_per_token(x)
    assert q.dtype == torch.int8 and sx.shape == (rows, 1)
    assert torch.equal(q, q_ref) and torch.equal(sx, sx_ref)
    assert q[0, :5].tolist() == [0, 0, 2, 2, -2]
    acc = torch.randint(-(1 << 24), 1 << 24, (rows, 96), dtype=torch.int32,
                        generator=torch.Generator().manual_seed(11))
    sw = _rand(96, 1, seed=12).abs().reshape(96).to(dtype).float()
    out = torch.ops.swakv.rescale_int32(acc, sx, sw, dtype)
    assert out.dtype == dtype and torch.equal(out, (acc.float().mul_(sx).mul_(sw)).to(dtype))
    strided = x[:, : cols // 2]  # rows cols apart: unit column stride is enough
    assert torch.equal(torch.ops.swakv.quantize_rows_int8(strided)[0],
                       quantize_per_token(strided)[0])


@pytest.mark.parametrize("rows", [0, 1, 5, 40])
def test_w8a8_gate_up_gelu_epilogue_is_bit_identical(rows: int) -> None:
    """rescale_gelu_mul_bf16 against rescale_int32 then gelu_tanh_mul_bf16, and the
    model's gate_up_gelu (which takes it for a w8a8 gate/up) against gelu_mul of the
    linear's output, for every kernel of the w8a8 gate/up dispatch."""
    from swakv.model.gemma3 import gate_up_gelu, gelu_mul

    acc = torch.randint(-(1 << 24), 1 << 24, (rows, 2 * 48), dtype=torch.int32,
                        generator=torch.Generator().manual_seed(15))
    sx = _rand(rows, 1, seed=16).abs() + 1e-3
    sw = (_rand(96, 1, seed=17).abs().reshape(96) * 1e-4).to(torch.bfloat16).float()
    out = torch.ops.swakv.rescale_gelu_mul_bf16(acc, sx, sw)
    two_pass = torch.ops.swakv.gelu_tanh_mul_bf16(
        torch.ops.swakv.rescale_int32(acc, sx, sw, torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.shape == (rows, 48)
    assert torch.equal(out, two_pass)
    packed = quantize_weight(Quantization.W8A8, "gate_up", _rand(2 * 64, 128, seed=18, scale=0.05))
    lin = make_quant_linear(Quantization.W8A8, "gate_up", packed, torch.bfloat16)
    for m in (1, 8, 16, 64):  # int8 weight-only, dense, w8a8 (from 16 rows)
        x = _rand(m, 128, seed=m).to(torch.bfloat16)
        assert torch.equal(gate_up_gelu(lin, x), gelu_mul(lin(x)))
    with pytest.raises(RuntimeError, match="acc int32"):
        torch.ops.swakv.rescale_gelu_mul_bf16(acc[:, :95].contiguous(), sx, sw[:95])
    with pytest.raises(RuntimeError, match="sw float32"):
        torch.ops.swakv.rescale_gelu_mul_bf16(acc, sx, sw[:48])


def test_w8a8_kernels_sharing_a_workspace_keep_their_results() -> None:
    """Two w8a8 kernels on one Int32Workspace (as a model's linears are): each output
    survives the other's later calls, at growing and shrinking row counts, and equals
    the kernel on a private workspace."""
    shared = Int32Workspace()
    a = W8A8Kernel(Int8Weights.quantize(_rand(96, 128, seed=19, scale=0.05)), torch.bfloat16, shared)
    b = W8A8Kernel(Int8Weights.quantize(_rand(200, 128, seed=20, scale=0.05)), torch.bfloat16, shared)
    alone = W8A8Kernel(Int8Weights.quantize(_rand(96, 128, seed=19, scale=0.05)), torch.bfloat16)
    for rows in (40, 7, 300, 1):
        x = _rand(rows, 128, seed=rows).to(torch.bfloat16)
        ya = a(x)
        yb = b(x)
        assert torch.equal(ya, alone(x)) and yb.shape == (rows, 200)
        assert torch.equal(a(x), ya)  # b's sums did not leak into a's result
    assert shared.take(3, 5, torch.device("cpu")).shape == (3, 5)


def test_fused_w8a8_passes_reject_bad_inputs() -> None:
    with pytest.raises(RuntimeError, match="unit column stride"):
        torch.ops.swakv.quantize_rows_int8(torch.zeros(4, 8).t())
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        torch.ops.swakv.quantize_rows_int8(torch.zeros(4, 8, dtype=torch.float16))
    acc = torch.zeros(2, 3, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="sx float32"):
        torch.ops.swakv.rescale_int32(acc, torch.ones(3), torch.ones(3), torch.float32)
    with pytest.raises(RuntimeError, match="sw float32"):
        torch.ops.swakv.rescale_int32(acc, torch.ones(2), torch.ones(2), torch.float32)
    with pytest.raises(RuntimeError, match="acc int32"):
        torch.ops.swakv.rescale_int32(acc.float(), torch.ones(2), torch.ones(3), torch.float32)


# ------------------------------------------------------------------------ dispatch


@pytest.mark.parametrize(
    "rows, expected",
    [(1, "int8"), (3, "int8"), (4, "dense"), (63, "dense"), (64, "w8a8"), (4096, "w8a8")],
)
def test_dispatch_kernel_for(rows: int, expected: str) -> None:
    d = Dispatch(((1, "int8"), (4, "dense"), (64, "w8a8")))
    assert d.kernel_for(rows) == expected


@pytest.mark.parametrize("steps", [(), ((2, "int8"),), ((1, "int8"), (1, "dense")),
                                   ((1, "int8"), (8, "dense"), (4, "w8a8"))])
def test_dispatch_rejects_bad_steps(steps: tuple) -> None:
    with pytest.raises(ValueError, match="dispatch steps"):
        Dispatch(steps)


def test_quant_linear_runs_the_kernel_of_its_row_count() -> None:
    calls: list[tuple[str, int]] = []

    def kernel(name: str):
        def run(x: torch.Tensor) -> torch.Tensor:
            calls.append((name, x.shape[0]))
            return torch.zeros(x.shape[0], 3)
        return run

    lin = QuantLinear({"int8": kernel("int8"), "dense": kernel("dense"), "w8a8": kernel("w8a8")},
                      Dispatch(((1, "int8"), (4, "dense"), (64, "w8a8"))), 3, 5)
    for rows in (1, 3, 4, 63, 64, 200):
        assert lin(torch.zeros(rows, 5)).shape == (rows, 3)
    assert lin(torch.zeros(2, 2, 5)).shape == (2, 2, 3)  # leading dims flatten to 4 rows
    assert calls == [("int8", 1), ("int8", 3), ("dense", 4), ("dense", 63), ("w8a8", 64),
                     ("w8a8", 200), ("dense", 4)]
    lin.dispatch = Dispatch(((1, "w8a8"),))
    lin(torch.zeros(1, 5))
    assert calls[-1] == ("w8a8", 1)
    with pytest.raises(ValueError, match="lacks"):
        lin.dispatch = Dispatch(((1, "int4"),))


@pytest.mark.parametrize("rows", [1, 4, 5, 64])  # int8g below 5 rows, tiled dense from 5
def test_quant_lm_head_into_a_buffer_equals_its_call(rows: int) -> None:
    """QuantLinear.into (the LM head's logits workspace path) gives the bits of
    __call__, for the weight-only kernel and for the dense kernel's row tiles."""
    n = LM_HEAD_TILE_ROWS + 96  # two tiles, the second short
    packed = Int8GroupWeights.quantize(_rand(n, 64, seed=15, scale=0.05))
    lin = make_quant_linear(Quantization.INT8, "lm_head", packed, torch.bfloat16)
    x = _rand(rows, 64, seed=16).to(torch.bfloat16)
    buf = torch.full((rows + 1, n), float("nan"), dtype=torch.bfloat16)
    got = lin.into(x, buf[:rows])
    assert got.data_ptr() == buf.data_ptr()
    assert torch.equal(got, lin(x)) and buf[rows].isnan().all()


def test_dispatch_table_covers_every_mode_and_role() -> None:
    allowed = {Quantization.INT8: {"int8g", "dense"}, Quantization.INT4: {"int4", "dense"},
               Quantization.W8A8: {"int8", "int8g", "dense", "w8a8"}}
    assert set(DISPATCH) == set(allowed)
    for mode, table in DISPATCH.items():
        assert set(table) == set(LINEAR_ROLES)
        for plan in table.values():
            assert set(plan.kernels) <= allowed[mode]
            assert plan.kernel_for(1) != "dense"  # one row: a weight-only kernel wins


@pytest.mark.parametrize("mode", [Quantization.INT8, Quantization.INT4, Quantization.W8A8])
def test_make_quant_linear_builds_only_dispatched_kernels(mode: Quantization) -> None:
    w = _rand(64, 128, seed=10, scale=0.05)
    for role in LINEAR_ROLES:
        packed = quantize_weight(mode, role, w)
        lin = make_quant_linear(mode, role, packed, torch.bfloat16)
        assert set(lin.kernels) == set(DISPATCH[mode][role].kernels)
        assert (lin.out_features, lin.in_features) == (64, 128)
    x = _rand(3, 128, seed=11).to(torch.bfloat16)
    # every kernel of a linear computes with the same effective weights
    lin = make_quant_linear(mode, "gate_up", quantize_weight(mode, "gate_up", w), torch.float32)
    x32 = x.float()
    outs = {}
    for name in lin.kernels:
        lin.dispatch = Dispatch(((1, name),))
        outs[name] = lin(x32)
    ref = outs["dense"]
    for name, y in outs.items():
        tol = 0.03 if name == "w8a8" else 1e-5  # w8a8 also quantizes the activations
        assert (y - ref).abs().max().item() <= tol * ref.abs().max().item(), name


def test_config_modes_match_the_enum() -> None:
    assert QUANTIZATION_MODES == tuple(m.value for m in Quantization)
    assert EngineConfig(quantization="w8a8").quantization == "w8a8"
    with pytest.raises(ValueError, match="quantization must be one of none, int8, int4, w8a8"):
        EngineConfig(quantization="fp8")


# ------------------------------------------------------------------------ disk cache


def _sources() -> dict[str, torch.Tensor]:
    return {"lm_head": _rand(64, 64, seed=12), "layers.0.qkv": _rand(96, 64, seed=13)}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        all(torch.equal(x, y) for x, y in zip(a[k].tensors().values(), b[k].tensors().values()))
        for k in a
    )


@pytest.mark.parametrize("mode", [Quantization.INT8, Quantization.INT4])
def test_cache_second_load_reads_the_file(tmp_path: Path, mode: Quantization,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    sources = _sources()
    first = load_or_quantize(mode, sources, tmp_path)
    fmt = packed_format(mode)
    path = cache_path(tmp_path, fmt, source_digest(fmt, sources))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]

    def no_quantize(*args: object) -> None:
        raise AssertionError("quantized again instead of reading the cache")

    monkeypatch.setattr(quant_cache, "quantize_weight", no_quantize)
    assert _equal(load_or_quantize(mode, sources, tmp_path), first)


def test_weight_format_per_mode_and_role() -> None:
    """w8a8 keeps per-channel int8 exactly where its _int_mm kernel runs."""
    for role in LINEAR_ROLES:
        assert weight_format(Quantization.INT8, role) == "int8g"
        assert weight_format(Quantization.INT4, role) == "int4"
        w8a8 = "w8a8" in DISPATCH[Quantization.W8A8][role].kernels
        assert weight_format(Quantization.W8A8, role) == ("int8" if w8a8 else "int8g")
    assert weight_format(Quantization.W8A8, "qkv") == "int8"
    assert weight_format(Quantization.W8A8, "lm_head") == "int8g"
    with pytest.raises(ValueError, match="no packed weights"):
        weight_format(Quantization.NONE, "qkv")


def test_cache_keeps_int8_and_w8a8_formats_apart(tmp_path: Path) -> None:
    """int8 (grouped scales) and w8a8 (per-channel scales for its _int_mm roles) hold
    different weights, in different files, each read back as written."""
    a = load_or_quantize(Quantization.INT8, _sources(), tmp_path)
    b = load_or_quantize(Quantization.W8A8, _sources(), tmp_path)
    assert packed_format(Quantization.INT8) == "int8-g32"
    assert packed_format(Quantization.W8A8) == "w8a8-g32"
    assert isinstance(a["layers.0.qkv"], Int8GroupWeights)
    assert isinstance(b["layers.0.qkv"], Int8Weights) and b["layers.0.qkv"].scales.shape == (96,)
    assert isinstance(b["lm_head"], Int8GroupWeights) and b["lm_head"].scales.shape == (64, 2)
    assert len(list(tmp_path.iterdir())) == 2
    assert _equal(load_or_quantize(Quantization.INT8, _sources(), tmp_path), a)
    assert _equal(load_or_quantize(Quantization.W8A8, _sources(), tmp_path), b)


def test_cache_corrupt_file_is_rebuilt(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sources = _sources()
    fresh = load_or_quantize(Quantization.INT8, sources, tmp_path)
    path = next(tmp_path.iterdir())
    path.write_bytes(path.read_bytes()[:100])  # truncated
    with caplog.at_level(logging.WARNING, logger="swakv.model"):
        again = load_or_quantize(Quantization.INT8, sources, tmp_path)
    assert "cannot read cache file" in caplog.text
    assert _equal(again, fresh)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="swakv.model"):
        load_or_quantize(Quantization.INT8, sources, tmp_path)  # the rewritten file is good
    assert caplog.text == ""


@pytest.mark.parametrize("damage", ["metadata", "shape", "extra"])
def test_cache_stale_file_is_rebuilt(tmp_path: Path, damage: str,
                                     caplog: pytest.LogCaptureFixture) -> None:
    from safetensors.torch import load_file, save_file

    sources = _sources()
    fresh = load_or_quantize(Quantization.INT8, sources, tmp_path)
    path = next(tmp_path.iterdir())
    tensors = load_file(str(path))
    meta = {"format_version": quant_cache.FORMAT_VERSION, "format": "int8-g32",
            "digest": source_digest("int8-g32", sources)}
    if damage == "metadata":
        meta["format_version"] = "0"
    elif damage == "shape":
        tensors["lm_head.scales"] = tensors["lm_head.scales"][:10].clone()
    else:
        tensors["other.qweight"] = torch.zeros(2, 2, dtype=torch.int8)
    save_file(tensors, str(path), metadata=meta)
    with caplog.at_level(logging.WARNING, logger="swakv.model"):
        again = load_or_quantize(Quantization.INT8, sources, tmp_path)
    assert "rebuilding" in caplog.text
    assert _equal(again, fresh)
    assert load_file(str(path)).keys() == {f"{k}.{f}" for k in sources for f in ("qweight",
                                                                                 "scales")}


def test_prune_removes_only_stale_files(tmp_path: Path) -> None:
    """Pruning (opt-in) removes the same format's files for other sources and formats
    no longer written; current formats, other names and temporary files stay."""
    stale = ["int4-g32-aaaaaaaaaaaaaaaa.safetensors", "int8-0123456789abcdef.safetensors",
             "int8-g32-ffffffffffffffff.safetensors"]
    kept = [f"{SMOOTH_FORMAT}-0000000000000000.safetensors",
            "w8a8-g32-1111111111111111.safetensors", "notes.txt",
            ".int8-g32-2222222222222222.safetensors.tmp-x"]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"x")
    sources = _sources()
    first = cache_path(tmp_path, "int8-g32", source_digest("int8-g32", sources))
    load_or_quantize(Quantization.INT8, sources, tmp_path)  # prune off: nothing removed
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(stale + kept + [first.name])
    changed = dict(sources, lm_head=sources["lm_head"] + 1e-3)
    load_or_quantize(Quantization.INT8, changed, tmp_path, prune=True)
    now = cache_path(tmp_path, "int8-g32", source_digest("int8-g32", changed))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + [now.name])
    assert _equal(load_or_quantize(Quantization.INT8, changed, tmp_path, prune=True),
                  load_or_quantize(Quantization.INT8, changed, None))


def test_model_prunes_only_a_cache_dir_it_owns(tiny, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A model under swakv's cache root prunes its own quant dir; one elsewhere writes
    to the shared dir, which holds other models' files, and removes nothing."""
    monkeypatch.setenv("SWAKV_CACHE_DIR", str(tmp_path))
    owned = tmp_path / "models" / "tiny"
    shutil.copytree(tiny.path, owned)
    for model_dir in (owned, tiny.path):
        quant = quant_cache_dir(model_dir)
        quant.mkdir(parents=True, exist_ok=True)
        (quant / "w8a8-g32-0000000000000000.safetensors").write_bytes(b"old")
        Gemma3Model(tiny.spec, tiny.weights, torch.float32, quantization="w8a8",
                    weights_dir=model_dir)
    assert model_owns_cache(owned) and not model_owns_cache(tiny.path)
    assert quant_cache_dir(owned) == owned.resolve() / "quant"
    owned_names = [p.name for p in quant_cache_dir(owned).iterdir()]
    shared_names = [p.name for p in quant_cache_dir(tiny.path).iterdir()]
    assert sorted(n.split("-")[0] for n in owned_names) == ["smooth", "w8a8"]
    assert "w8a8-g32-0000000000000000.safetensors" in shared_names
    assert len(shared_names) == 3


def test_cache_key_follows_the_source_weights(tmp_path: Path) -> None:
    sources = _sources()
    load_or_quantize(Quantization.INT4, sources, tmp_path)
    changed = dict(sources, lm_head=sources["lm_head"] + 1e-3)
    load_or_quantize(Quantization.INT4, changed, tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 2 and all(n.startswith("int4s-g32-") for n in names)
    assert source_digest("int4s-g32", sources) != source_digest("int4s-g32", changed)


def test_cache_unwritable_dir_still_quantizes(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    packed = load_or_quantize(Quantization.INT8, _sources(), blocker / "quant")
    assert _equal(packed, load_or_quantize(Quantization.INT8, _sources(), None))


def test_quant_cache_dir_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWAKV_CACHE_DIR", str(tmp_path / "cache"))
    inside = tmp_path / "cache" / "models" / "m"
    inside.mkdir(parents=True)
    assert quant_cache.quant_cache_dir(inside) == inside.resolve() / "quant"
    outside = tmp_path / "user_model"
    outside.mkdir()
    assert quant_cache.quant_cache_dir(outside) == (tmp_path / "cache").resolve() / "quant"


# --------------------------------------------------------------------------- model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    path = make_tiny_gemma3_dir(tmp_path_factory.mktemp("quant") / "m", num_layers=2,
                                window=8, sliding_pattern=2, seed=7)
    return load_model_dir(path)


@pytest.mark.parametrize("mode", ["int8", "int4", "w8a8"])
def test_model_routes_every_linear_and_keeps_exact_embedding(tiny, mode: str,
                                                             tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    monkeypatch.setenv("SWAKV_CACHE_DIR", str(tmp_path))
    model = Gemma3Model(tiny.spec, tiny.weights, torch.bfloat16, quantization=mode,
                        weights_dir=tiny.path)
    assert model.quantization == Quantization(mode)
    assert len(model.linears) == 1 + 4 * tiny.spec.num_layers
    assert all(isinstance(lin, QuantLinear) for lin in model.linears.values())
    assert model.lm_head is model.linears["lm_head"]
    assert model.layers[1].down is model.linears["layers.1.down"]
    assert torch.equal(model.embed, tiny.weights["model.embed_tokens.weight"].bfloat16())
    names = sorted(p.name for p in (tmp_path / "quant").iterdir())  # outside the model dir
    # w8a8 also caches its smoothing factors (swakv.model.smoothing)
    fmt = packed_format(Quantization(mode))
    assert [n.rsplit("-", 1)[0] for n in names] == (
        [f"smooth-{SMOOTH_VERSION}-a{ALPHA}", fmt] if mode == "w8a8" else [fmt])


def test_model_none_is_dense_and_unchanged(tiny) -> None:
    model = Gemma3Model(tiny.spec, tiny.weights, torch.float32)
    assert all(isinstance(lin, DenseKernel) for lin in model.linears.values())


@pytest.mark.parametrize("mode", ["int8", "int4", "w8a8"])
def test_quantized_model_kernels_agree_and_track_fp32(tiny, mode: str) -> None:
    """In fp32, every kernel of a mode gives the same logits (same effective weights;
    w8a8 adds activation rounding), and all stay near the unquantized model."""
    ids = torch.randint(0, tiny.spec.vocab_size, (24,),
                        generator=torch.Generator().manual_seed(3)).tolist()
    exact = prompt_logits(Gemma3Model(tiny.spec, tiny.weights, torch.float32), ids)
    model = Gemma3Model(tiny.spec, tiny.weights, torch.float32, quantization=mode)
    per_kernel = {}
    plans = {lin: lin.dispatch.steps for lin in model.linears.values()}
    paths = {"small": lambda steps: steps[0][1], "large": lambda steps: steps[-1][1],
             "dense": lambda steps: "dense"}
    for path, pick in paths.items():
        for lin, steps in plans.items():
            lin.dispatch = Dispatch(((1, pick(steps)),))
        per_kernel[path] = prompt_logits(model, ids)
    uses_w8a8 = any(steps[-1][1] == "w8a8" for steps in plans.values())
    scale = exact.abs().max().item()
    for name, logits in per_kernel.items():
        tol = 0.05 if name == "large" and uses_w8a8 else 1e-4
        assert (logits - per_kernel["dense"]).abs().max().item() <= tol * scale, name
    drift = (per_kernel["dense"] - exact).abs().max().item()
    assert drift <= (0.3 if mode == "int4" else 0.05) * scale
