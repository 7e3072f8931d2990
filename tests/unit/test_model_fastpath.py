"""The bf16 fast path: prepacked matmuls are bit-identical, and the model stays close."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from swakv.config import KVLayout
from swakv.engine.runner import BatchItem, ModelRunner
from swakv.memory import KVPool, ReqTable, SWAAllocator
from swakv.model.gemma3 import Gemma3Model, Linear, _mkldnn_bf16
from swakv.model.loader import load_model_dir
from swakv.model.testing import load_hf_reference, make_tiny_gemma3_dir


@pytest.mark.skipif(not _mkldnn_bf16(), reason="CPU without oneDNN bf16")
@pytest.mark.parametrize("rows", [1, 3, 16, 100])
def test_prepacked_linear_is_bit_identical(rows: int) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 64, generator=g)
    x = torch.randn(rows, 64, generator=g).to(torch.bfloat16)
    lin = Linear(w, torch.bfloat16)
    assert torch.equal(lin(x), F.linear(x, w.to(torch.bfloat16)))
    plain = Linear(w, torch.bfloat16, prepack=False)
    assert torch.equal(plain(x), F.linear(x, w.to(torch.bfloat16)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 3, 64])
def test_tiled_linear_into_a_buffer_is_bit_identical(dtype: torch.dtype, rows: int) -> None:
    """The LM head's layout: tiles of output rows (the last one short), written in place."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(100, 64, generator=g)
    x = torch.randn(rows, 64, generator=g).to(dtype)
    ref = F.linear(x, w.to(dtype))
    lin = Linear(w, dtype, tile_rows=32)
    assert torch.equal(lin(x), ref)
    buf = torch.full((rows + 2, 100), float("nan"), dtype=dtype)
    got = lin.into(x, buf[:rows])
    assert got.data_ptr() == buf.data_ptr() and torch.equal(got, ref)
    assert buf[rows:].isnan().all()  # nothing written past the rows asked for


def test_fp32_linear_is_plain() -> None:
    w = torch.randn(8, 4)
    x = torch.randn(3, 4)
    assert torch.equal(Linear(w, torch.float32)(x), F.linear(x, w))


def test_bf16_model_tracks_fp32_reference(tmp_path: Path) -> None:
    """bf16 weights, activations and KV: logits within bf16 error of transformers fp32."""
    path = make_tiny_gemma3_dir(tmp_path / "m", num_layers=4, window=8, sliding_pattern=2, seed=5)
    loaded = load_model_dir(path)
    model = Gemma3Model(loaded.spec, loaded.weights, dtype=torch.bfloat16)
    alloc = SWAAllocator(16, 16, 4)
    pool = KVPool(KVLayout.from_model(loaded.spec, torch.bfloat16), alloc)
    table = ReqTable(1, 64)
    runner = ModelRunner(model, pool, table, validate=True)
    ids = torch.randint(0, loaded.spec.vocab_size, (32,), generator=torch.Generator().manual_seed(1))
    row = table.alloc_row()
    table.write(row, 0, alloc.alloc(32))
    out = runner.forward([BatchItem(row, 0, ids.tolist())], return_all_logits=True)
    assert out.all_logits is not None
    ours = out.all_logits[0]
    assert ours.dtype == torch.float32
    with torch.no_grad():
        ref = load_hf_reference(path)(ids[None]).logits[0]
    err = (ours - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err < 0.05 * scale, f"bf16 error {err} vs logit scale {scale}"
    agree = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= 0.9


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_reused_logits_equal_fresh_ones(tmp_path: Path, dtype: torch.dtype) -> None:
    """forward(reuse_logits=True) returns the same logits, in one buffer reused across
    steps and grown for a larger batch."""
    path = make_tiny_gemma3_dir(tmp_path / "m", num_layers=2, window=8, sliding_pattern=2, seed=3)
    loaded = load_model_dir(path)
    model = Gemma3Model(loaded.spec, loaded.weights, dtype=dtype)
    alloc = SWAAllocator(32, 32, 4)
    pool = KVPool(KVLayout.from_model(loaded.spec, dtype), alloc)
    table = ReqTable(4, 64)
    runner = ModelRunner(model, pool, table, validate=True)
    g = torch.Generator().manual_seed(2)
    rows = [table.alloc_row() for _ in range(3)]
    for r in rows:
        table.write(r, 0, alloc.alloc(12))
    ids = [torch.randint(0, loaded.spec.vocab_size, (12,), generator=g).tolist() for _ in rows]
    seen = []
    for batch in ([BatchItem(rows[0], 0, ids[0][:6])],
                  [BatchItem(rows[0], 6, ids[0][6:7]), BatchItem(rows[1], 0, ids[1][:5]),
                   BatchItem(rows[2], 0, ids[2][:4])],
                  [BatchItem(rows[1], 5, ids[1][5:6]), BatchItem(rows[2], 4, ids[2][4:9])]):
        fresh = runner.forward(batch, fp32_logits=False).last_logits.clone()
        reused = runner.forward(batch, fp32_logits=False, reuse_logits=True).last_logits
        assert reused.dtype == dtype and torch.equal(reused, fresh)
        seen.append(reused.data_ptr())
    assert seen[0] != seen[1] == seen[2]  # grown once (1 -> 4 rows), then reused for 2
