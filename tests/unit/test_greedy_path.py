"""The greedy fast path: tokens taken from the LM head tile by tile
(`swakv.argmax_update_bf16`, `DenseKernel.argmax`, `ModelRunner.forward(greedy_rows=...)`) are
the sampler's argmax of the full logits, ties and NaN included."""

from __future__ import annotations

import pytest
import torch

from swakv.config import EngineConfig
from swakv.engine.build import build_engine
from swakv.kernels.cpu_build import cpu_kernels_available
from swakv.memory.sizes import PoolSizes
from swakv.model.quant import (
    DenseKernel,
    Quantization,
    make_quant_linear,
    quantize_weight,
)
from swakv.model.sampler import greedy_ids
from swakv.sampling_params import SamplingParams


@pytest.fixture(autouse=True, scope="module")
def _kernels() -> None:
    assert cpu_kernels_available(), "the C++ kernels must build on this machine"


def _tiled_argmax(x: torch.Tensor, tile: int) -> torch.Tensor:
    best_value = torch.full((x.shape[0],), float("-inf"))
    best_index = torch.zeros(x.shape[0], dtype=torch.int64)
    for lo in range(0, x.shape[1], tile):
        torch.ops.swakv.argmax_update_bf16(x[:, lo : lo + tile], best_value, best_index, lo)
    return best_index


@pytest.mark.parametrize("cols, tile", [(1000, 1000), (1000, 48), (4096, 512), (7, 3)])
def test_argmax_update_bf16_is_torch_argmax(cols: int, tile: int) -> None:
    """Tiles fed in column order give torch's first maximum: ties across lanes and
    tiles keep the lowest column, an all -inf row gives column 0, the first NaN wins;
    on a row-strided view too."""
    gen = torch.Generator().manual_seed(cols + tile)
    wide = (torch.randn(6, cols + 5, generator=gen) * 4).to(torch.bfloat16)
    x = wide[:, :cols]
    x[0, cols - 1] = x[0, 1] = x[0].max() + 1  # a tie: column 1 wins
    x[1] = float("-inf")
    if cols > 3:
        x[2, 3] = float("nan")
        x[2, cols - 1] = float("nan")
        x[3, 2] = float("inf")
    got = _tiled_argmax(x, tile)
    assert torch.equal(got, x.float().argmax(-1))
    assert got[0] == 1 and got[1] == 0
    assert torch.equal(got, greedy_ids(x.contiguous()))


def test_argmax_update_bf16_rejects_bad_inputs() -> None:
    x = torch.zeros(2, 8, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="x bf16"):
        torch.ops.swakv.argmax_update_bf16(x.float(), torch.zeros(2),
                                           torch.zeros(2, dtype=torch.int64), 0)
    with pytest.raises(RuntimeError, match="best_value"):
        torch.ops.swakv.argmax_update_bf16(x, torch.zeros(3), torch.zeros(2, dtype=torch.int64), 0)
    with pytest.raises(RuntimeError, match="best_index"):
        torch.ops.swakv.argmax_update_bf16(x, torch.zeros(2), torch.zeros(2), 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 5, 64])
def test_dense_argmax_is_argmax_of_the_output(dtype: torch.dtype, rows: int) -> None:
    """Over several prepacked tiles (a partial last one) and on plain float32 weights;
    two equal weight rows in different tiles tie, and the first wins."""
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(200, 64, generator=gen) * 0.1
    w[150] = w[10]
    kernel = DenseKernel(w, dtype, tile_rows=48)
    x = torch.randn(rows, 64, generator=gen).to(dtype)
    x[0] = w[10].to(dtype) * 50  # rows 10 and 150 lead, tied
    got = kernel.argmax(x)
    assert torch.equal(got, greedy_ids(kernel(x)))
    assert got[0] == 10


@pytest.mark.parametrize("rows", [1, 8])
def test_quant_linear_argmax_uses_the_kernel_for_its_rows(rows: int) -> None:
    """w8a8's LM head: grouped int8 for one row, the dense tiles for eight."""
    w = torch.randn(300, 64, generator=torch.Generator().manual_seed(3)) * 0.1
    lin = make_quant_linear(Quantization.W8A8, "lm_head",
                            quantize_weight(Quantization.W8A8, "lm_head", w), torch.bfloat16)
    x = torch.randn(rows, 64).to(torch.bfloat16)
    assert torch.equal(lin.argmax(x), greedy_ids(lin(x)))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from swakv.model.testing import make_tiny_gemma3_dir

    path = tmp_path_factory.mktemp("tiny_greedy")
    make_tiny_gemma3_dir(path, num_layers=3, window=8, vocab=128, seed=9)
    return str(path)


def _outputs(tiny_dir: str, dtype: str, fast: bool,
             params: list[SamplingParams]) -> tuple[list[list[int]], int]:
    eng = build_engine(tiny_dir, EngineConfig(page_size=4, chunk_size=16, dtype=dtype,
                                              max_running_requests=8, decode_reserve=8),
                       sizes=PoolSizes(256, 256, 4, 0, 0))
    eng.executor.greedy_fast_path = fast
    calls = 0
    forward = eng.runner.forward

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += kwargs.get("greedy_rows") is not None
        return forward(*args, **kwargs)

    eng.runner.forward = counted  # type: ignore[method-assign]
    reqs = [eng.add_request([5 + (i * 7 + j) % 100 for j in range(9 + 5 * i)], p)
            for i, p in enumerate(params)]
    for _ in range(500):
        if all(r.is_finished for r in reqs):
            break
        eng.step()
        eng.check_integrity()
    assert all(r.is_finished for r in reqs)
    eng.flush_cache()
    eng.check_integrity()
    assert eng.allocator.available() == eng.allocator.total()  # every page came back
    assert eng.req_table.num_free == eng.req_table.num_rows
    return [list(r.output_ids) for r in reqs], calls


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_engine_greedy_fast_path_gives_the_sampler_tokens(tiny_dir: str, dtype: str) -> None:
    """Greedy requests decode the same tokens with and without the fast path; a batch
    with a logprobs request, a penalty or a min_tokens ban takes the sampler."""
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    plain = [greedy] * 4
    fast, fast_calls = _outputs(tiny_dir, dtype, True, plain)
    slow, slow_calls = _outputs(tiny_dir, dtype, False, plain)
    assert fast == slow and fast_calls > 0 and slow_calls == 0
    mixed = [greedy, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2),
             SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                            repetition_penalty=1.3),
             SamplingParams(temperature=0, max_tokens=12, min_tokens=12)]
    fast, _ = _outputs(tiny_dir, dtype, True, mixed)
    slow, _ = _outputs(tiny_dir, dtype, False, mixed)
    assert fast == slow


@pytest.mark.parametrize("fast", [True, False])
def test_lm_head_runs_only_on_rows_that_sample(tiny_dir: str, fast: bool) -> None:
    """Prefill chunks that do not complete their prompt never reach the LM head: a step
    of such chunks alone skips it, and a mixed step builds one row per sampling item
    (the greedy path and the sampler's alike); the tokens match a one-chunk prefill."""
    def run(chunk_size: int) -> tuple[list[list[int]], list[int]]:
        eng = build_engine(tiny_dir, EngineConfig(page_size=4, chunk_size=chunk_size,
                                                  max_running_requests=8, decode_reserve=8),
                           sizes=PoolSizes(256, 256, 4, 0, 0))
        eng.executor.greedy_fast_path = fast
        model, head_rows = eng.runner.model, []
        real_logits, real_greedy = model.compute_logits, model.greedy_tokens
        model.compute_logits = lambda h, *a, **k: head_rows.append(h.shape[0]) or real_logits(h, *a, **k)
        model.greedy_tokens = lambda h: head_rows.append(h.shape[0]) or real_greedy(h)
        params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        reqs = [eng.add_request([7 + (3 * i + j) % 90 for j in range(n)], params)
                for i, n in enumerate((40, 5, 23))]
        sampled_per_step = []
        while not all(r.is_finished for r in reqs):
            before = sum(r.num_output_tokens for r in reqs)
            eng.step()
            eng.check_integrity()
            sampled_per_step.append(sum(r.num_output_tokens for r in reqs) - before)
        assert head_rows == [n for n in sampled_per_step if n > 0]
        eng.flush_cache()
        eng.check_integrity()
        assert eng.allocator.available() == eng.allocator.total()  # every page came back
        return [list(r.output_ids) for r in reqs], sampled_per_step

    chunked, sampled = run(8)
    assert 0 in sampled  # steps of incomplete chunks only: no LM head ran in them
    whole, _ = run(64)
    assert chunked == whole
