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
