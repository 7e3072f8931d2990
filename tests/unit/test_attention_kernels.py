"""Attention kernels (C++ on CPU and the torch path) against a naive reference.

Scenario: rows allocated in interleaved chunks (scattered pages), SWA pages below each
row's frontier freed, every slot the batch must not read poisoned with NaN (padding
page 0, unallocated and freed slots), then one batch mixing decodes and extends whose
outputs are compared with softmax attention over the exact visible positions.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from swakv.config import AttentionSpec, AttnKind, KVLayout
from swakv.kernels import cpu_build
from swakv.memory import KVPool, ReqTable, SWAAllocator, max_frontier
from swakv.model import attention
from swakv.model.attention import attend, build_attention_metadata

HEADS, DIM = 4, 32
# (row length, new tokens): decodes with 1, extends otherwise; one full-layer decode
# long enough to span several 256-key chunks of the decode kernel
ROWS = ((700, 1), (37, 1), (5, 5), (90, 23), (19, 1), (64, 2))


@pytest.fixture(params=["auto", "torch"])
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "auto":
        assert cpu_build.cpu_kernels_available(), "the C++ kernels must build on this machine"
    attention.set_backend(request.param)
    yield request.param
    attention.set_backend("auto")


def _scenario(page: int, window: int | None, kv_heads: int, dtype: torch.dtype, seed: int):
    """Pool with one layer (full if window is None), rows filled up to each item's prefix.

    Returns (pool, table, alloc, items, history_k, history_v, q, k_new, v_new)."""
    g = torch.Generator().manual_seed(seed)
    total = sum(n for n, _ in ROWS)
    pages = total // page + len(ROWS) * 3 + 4
    alloc = SWAAllocator(pages, pages, page)
    kind = AttnKind.SLIDING if window else AttnKind.FULL
    spec = AttentionSpec(kind, kv_heads, DIM, 1e4, window=window)
    pool = KVPool(KVLayout((spec,), dtype), alloc)
    for t in pool.full_k + pool.full_v + pool.swa_k + pool.swa_v:
        t.fill_(float("nan"))
    table = ReqTable(num_rows=len(ROWS), max_context=max(n for n, _ in ROWS))
    rows = [table.alloc_row() for _ in ROWS]
    done = [0] * len(ROWS)
    while any(d < n for d, (n, _) in zip(done, ROWS)):  # interleaved: scattered pages
        for i, (n, _) in enumerate(ROWS):
            if done[i] < n:
                step = int(torch.randint(1, 3 * page + 2, (1,), generator=g))
                end = min(n, done[i] + step)
                last = int(table.slots[rows[i], done[i] - 1]) if done[i] else None
                table.write(rows[i], done[i], alloc.alloc_extend(done[i], end, last))
                done[i] = end
    hist_k = [torch.randn(n, kv_heads, DIM, generator=g).to(dtype) for n, _ in ROWS]
    hist_v = [torch.randn(n, kv_heads, DIM, generator=g).to(dtype) for n, _ in ROWS]
    items = []
    for r, (n, new), hk, hv in zip(rows, ROWS, hist_k, hist_v):
        prefix = n - new
        full = table.read(r, 0, prefix)
        if window is None:
            pool.write(0, full, hk[:prefix], hv[:prefix])
        else:
            mapped = alloc.is_swa_mapped(full)
            pool.write(0, alloc.translate(full[mapped]), hk[:prefix][mapped], hv[:prefix][mapped])
            # unmapped pages outside the window: the next query must not read them
            swa = alloc.translate(table.read(r, 0, max_frontier(prefix, window, page)))
            alloc.free_swa(table.read(r, 0, max_frontier(prefix, window, page)))
            for t in pool.swa_k + pool.swa_v:
                t[swa] = float("nan")
        items.append((r, prefix, new))
    num_tokens = sum(new for _, new in ROWS)
    q = torch.randn(num_tokens, HEADS, DIM, generator=g).to(dtype)
    k_new = torch.cat([hk[n - new :] for hk, (n, new) in zip(hist_k, ROWS)])
    v_new = torch.cat([hv[n - new :] for hv, (n, new) in zip(hist_v, ROWS)])
    return pool, table, alloc, items, hist_k, hist_v, q, k_new, v_new


def _reference(q, hist_k, hist_v, window, scale, softcap) -> torch.Tensor:
    """fp32 softmax attention of each token over its visible positions [T, H * D]."""
    out = []
    tok = 0
    for (n, new), hk, hv in zip(ROWS, hist_k, hist_v):
        for pos in range(n - new, n):
            lo = 0 if window is None else max(0, pos - window + 1)
            group = HEADS // hk.shape[1]
            k = hk[lo : pos + 1].float().repeat_interleave(group, 1)
            v = hv[lo : pos + 1].float().repeat_interleave(group, 1)
            s = torch.einsum("hd,khd->hk", q[tok].float(), k) * scale
            if softcap is not None:
                s = torch.tanh(s / softcap) * softcap
            out.append(torch.einsum("hk,khd->hd", torch.softmax(s, -1), v).reshape(-1))
            tok += 1
    return torch.stack(out)


# windows below, at and above the page size (None: a full layer)
CASES = [(1, None), (1, 3), (4, 3), (4, 4), (4, 9), (16, 5), (16, 16), (16, 40), (16, None)]


@pytest.mark.parametrize(("page", "window"), CASES)
@pytest.mark.parametrize("kv_heads", [1, 2])
@pytest.mark.parametrize("softcap", [None, 2.5])
def test_mixed_batch_matches_reference_fp32(backend: str, page: int, window: int | None,
                                            kv_heads: int, softcap: float | None) -> None:
    pool, table, alloc, items, hk, hv, q, k, v = _scenario(page, window, kv_heads, torch.float32, 7)
    meta = build_attention_metadata(items, table.slots, alloc, window, block=16, validate=True)
    plan = meta.full if window is None else meta.sliding
    assert plan is not None
    out = attend(0, q, k, v, plan, pool, scale=0.4, softcap=softcap)
    ref = _reference(q, hk, hv, window, 0.4, softcap)
    assert torch.isfinite(out).all(), "a poisoned slot was read"
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize(("page", "window"), [(1, None), (4, 3), (16, 40)])
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("kv_heads", [1, 2])
def test_mixed_batch_bf16_within_bf16_tolerance(backend: str, page: int, window: int | None, fused: bool,
                                                kv_heads: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 extends take the fused kernel (`fused`) or the per-block kernels."""
    if not fused:
        monkeypatch.setattr(attention, "_flash_fits", lambda dim: False)
    pool, table, alloc, items, hk, hv, q, k, v = _scenario(page, window, kv_heads, torch.bfloat16, 3)
    meta = build_attention_metadata(items, table.slots, alloc, window)
    plan = meta.full if window is None else meta.sliding
    assert plan is not None
    out = attend(0, q, k, v, plan, pool, scale=0.4)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    ref = _reference(q, hk, hv, window, 0.4, None)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def test_kernel_and_torch_paths_agree_on_long_extend_blocks() -> None:
    """Default block sizes (long prefix: blocks shrink by the pair budget) agree exactly
    enough between the two paths in fp32."""
    assert cpu_build.cpu_kernels_available()
    pool, table, alloc, items, hk, hv, q, k, v = _scenario(4, None, 2, torch.float32, 11)
    outs = []
    for name in ("auto", "torch"):
        attention.set_backend(name)
        try:
            meta = build_attention_metadata(items, table.slots, alloc, None)
            outs.append(attend(0, q, k, v, meta.full, pool, scale=0.25))
        finally:
            attention.set_backend("auto")
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


def test_masked_softmax_kernel_rows_and_zeros() -> None:
    """Row r = query (r % rows_per_kv_head) // group; columns outside its range are 0."""
    assert cpu_build.cpu_kernels_available()
    g = torch.Generator().manual_seed(0)
    nq, group, kv_heads, num_keys, q_pos0, k_pos0, window = 5, 2, 2, 9, 10, 6, 4
    scores = torch.randn(kv_heads * nq * group, num_keys, generator=g)
    expected = torch.zeros_like(scores)
    for r in range(scores.shape[0]):
        pos = q_pos0 + (r % (nq * group)) // group
        lo, hi = max(0, pos - window + 1 - k_pos0), pos + 1 - k_pos0
        expected[r, lo:hi] = torch.softmax(torch.tanh(scores[r, lo:hi] * 0.5 / 3.0) * 3.0, -1)
    out = torch.ops.swakv.masked_softmax_out(
        scores, scores, group, nq * group, q_pos0, k_pos0, window, 0.5, 3.0)
    assert out.data_ptr() == scores.data_ptr()
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    assert (out[:, 0] == 0).all() and (out[-1, :4] == 0).all()


def test_masked_softmax_kernel_fp32_scores_to_bf16_probs() -> None:
    assert cpu_build.cpu_kernels_available()
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(8, 12, generator=g) * 20
    out = torch.empty(8, 12, dtype=torch.bfloat16)
    torch.ops.swakv.masked_softmax_out(scores, out, 1, 8, 4, 0, 0, 0.3, 0.0)
    expected = torch.zeros(8, 12)
    for r in range(8):
        expected[r, : 5 + r] = torch.softmax(scores[r, : 5 + r] * 0.3, -1)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=4e-3, rtol=8e-3)


@pytest.mark.parametrize(("num_keys", "key_lo", "key_hi", "rows"),
                         [(37, 0, 37, 13), (100, 5, 77, 9), (40, 17, 18, 8), (767, 3, 700, 130)])
def test_bf16_dot_kernel_gives_fp32_scores(num_keys: int, key_lo: int, key_hi: int, rows: int) -> None:
    """Exact bf16 products summed in fp32, for strided key rows and unaligned ranges."""
    assert cpu_build.cpu_kernels_available()
    if not torch.ops.swakv.bf16_dot_supported():
        with pytest.raises(RuntimeError, match="AVX512-BF16"):
            torch.ops.swakv.qk_scores_bf16(torch.zeros(1, 32, dtype=torch.bfloat16),
                                           torch.zeros(1, 16, 16, 2, dtype=torch.bfloat16), 0, 1)
        return
    g = torch.Generator().manual_seed(num_keys)
    keys = torch.randn(num_keys, 2, 64, generator=g).bfloat16()[:, 1]  # rows 128 apart
    q = torch.randn(rows, 64, generator=g).bfloat16()
    packed = torch.ops.swakv.pack_keys_bf16(keys)
    assert packed.shape == ((num_keys + 15) // 16, 32, 16, 2)
    assert packed[0, 3, 5].tolist() == keys[5, 6:8].tolist()
    scores = torch.ops.swakv.qk_scores_bf16(q, packed, key_lo, key_hi)
    ref = q.double() @ keys[key_lo:key_hi].double().t()
    assert scores.dtype == torch.float32 and scores.shape == (rows, key_hi - key_lo)
    torch.testing.assert_close(scores.double(), ref, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize(("n", "group", "q_pos0", "key_pos", "window", "softcap"),
                         [(1, 4, 0, 0, 0, 0.0), (37, 4, 0, 0, 0, 0.0), (21, 4, 60, 0, 0, 0.0),
                          (50, 4, 90, 75, 16, 0.0), (13, 2, 40, 9, 32, 2.5), (9, 1, 5, 0, 0, 0.0),
                          (70, 4, 700, 189, 512, 0.0), (130, 4, 300, 0, 0, 0.0),
                          (200, 4, 1000, 377, 300, 2.0)])
def test_flash_extend_kernel_matches_softmax_attention(n: int, group: int, q_pos0: int, key_pos: int,
                                                       window: int, softcap: float) -> None:
    """Fused prefill attention: query i (position q_pos0 + i) of each head sees key
    positions [max(key_pos, pos - window + 1), pos] (window 0: from key_pos), read from
    strided q / out views and packed strided keys and values."""
    assert cpu_build.cpu_kernels_available()
    if not torch.ops.swakv.bf16_dot_supported():
        z = torch.zeros(1, 1, 32, dtype=torch.bfloat16)
        with pytest.raises(RuntimeError, match="AVX512-BF16"):
            torch.ops.swakv.flash_extend_bf16(z, torch.zeros(1, 16, 16, 2, dtype=torch.bfloat16),
                                              torch.zeros(1, 32, 2, dtype=torch.bfloat16), z.clone(),
                                              0, 0, 0, 1.0, 0.0)
        return
    g = torch.Generator().manual_seed(n * 7 + group)
    dim, num_keys = 64, q_pos0 + n - key_pos
    keys = torch.randn(num_keys, 2, dim, generator=g).bfloat16()[:, 1]  # rows 128 apart
    values = torch.randn(num_keys, 2, dim, generator=g).bfloat16()[:, 0]
    q = torch.randn(n, 3 * group, dim, generator=g).bfloat16()[:, group : 2 * group]
    out_all = torch.full((n, 3 * group * dim), float("nan"), dtype=torch.bfloat16)
    out = out_all[:, group * dim : 2 * group * dim].view(n, group, dim)
    packed_v = torch.ops.swakv.pack_values_bf16(values)
    assert packed_v.shape == ((num_keys + 1) // 2, dim, 2)
    if num_keys >= 4:
        assert packed_v[1, 5].tolist() == [values[2, 5].item(), values[3, 5].item()]
    res = torch.ops.swakv.flash_extend_bf16(q, torch.ops.swakv.pack_keys_bf16(keys), packed_v, out,
                                            q_pos0, key_pos, window, 0.3, softcap)
    assert res.data_ptr() == out.data_ptr()
    assert out_all[:, : group * dim].isnan().all() and out_all[:, 2 * group * dim :].isnan().all()
    for i in range(n):
        hi = q_pos0 + i + 1 - key_pos
        lo = max(0, hi - window) if window else 0
        s = q[i].double() @ keys[lo:hi].double().t() * 0.3
        if softcap:
            s = torch.tanh(s / softcap) * softcap
        ref = torch.softmax(s, -1) @ values[lo:hi].double()
        torch.testing.assert_close(out[i].double(), ref, atol=1.5e-2, rtol=1.5e-2)


def test_flash_extend_kernel_rejects_bad_shapes() -> None:
    """Typed errors, not reads past the packed keys: head_dim not a multiple of 32, packing
    of another head_dim, or queries whose keys the packing does not hold."""
    assert cpu_build.cpu_kernels_available()
    q = torch.zeros(4, 2, 64, dtype=torch.bfloat16)
    k = torch.zeros(10, 64, dtype=torch.bfloat16)
    pk, pv = torch.ops.swakv.pack_keys_bf16(k), torch.ops.swakv.pack_values_bf16(k)
    flash = torch.ops.swakv.flash_extend_bf16
    with pytest.raises(RuntimeError, match="multiple of 32"):
        q48 = torch.zeros(4, 2, 48, dtype=torch.bfloat16)
        flash(q48, pk, pv, q48.clone(), 0, 0, 0, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="match q"):
        flash(q, pk[:, :16], pv, q.clone(), 0, 0, 0, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="cover every query"):
        flash(q, pk, pv, q.clone(), 7, 0, 0, 1.0, 0.0)  # positions 7..10 need 11 keys
    with pytest.raises(RuntimeError, match="out like q"):
        flash(q, pk, pv, torch.zeros(4, 2, 32, dtype=torch.bfloat16), 0, 0, 0, 1.0, 0.0)


def test_paged_decode_rejects_mixed_dtypes() -> None:
    assert cpu_build.cpu_kernels_available()
    kp = torch.zeros(8, 1, 32)
    idx = torch.zeros(1, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="one dtype"):
        torch.ops.swakv.paged_decode(torch.zeros(1, 4, 32, dtype=torch.bfloat16), kp, kp,
                                     torch.zeros(1, 4, dtype=torch.int64), idx, idx, idx + 1,
                                     torch.empty(0, dtype=torch.int64), 1, 1.0, 0.0)


def test_build_is_cached_by_source_key(tmp_path: Path) -> None:
    """A second build finds the library; a missing compiler is a typed error."""
    cached = cpu_build.build()
    assert cached.exists() and cached.parent.name == cpu_build.build_key("c++")
    mtime = cached.stat().st_mtime_ns
    assert cpu_build.build() == cached and cached.stat().st_mtime_ns == mtime


def test_missing_compiler_falls_back_with_one_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CXX", "swakv-no-such-compiler")
    with pytest.raises(cpu_build.KernelBuildError, match="no C\\+\\+ compiler"):
        cpu_build.build(tmp_path)
    with caplog.at_level(logging.WARNING, logger="swakv.kernels"):
        assert cpu_build.try_load(lambda: cpu_build.build(tmp_path)) is False
    warnings = [r for r in caplog.records if r.name == "swakv.kernels"]
    assert len(warnings) == 1 and "using the torch path" in warnings[0].getMessage()
    assert list(tmp_path.iterdir()) == []


def test_set_backend_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="backend must be one of"):
        attention.set_backend("flex")


def test_torch_path_serves_a_mixed_batch_without_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the kernels unavailable (no compiler) attention still matches the reference."""
    monkeypatch.setattr(attention, "cpu_kernels_available", lambda: False)
    pool, table, alloc, items, hk, hv, q, k, v = _scenario(4, 9, 2, torch.float32, 5)
    meta = build_attention_metadata(items, table.slots, alloc, 9)
    assert meta.sliding is not None
    out = attend(0, q, k, v, meta.sliding, pool, scale=0.4)
    torch.testing.assert_close(out, _reference(q, hk, hv, 9, 0.4, None), atol=2e-5, rtol=2e-5)


def test_paged_decode_rejects_slots_and_ranges_outside_the_pool() -> None:
    """A corrupt table raises instead of reading out of bounds."""
    assert cpu_build.cpu_kernels_available()
    pool = torch.zeros(8, 1, 32)
    q = torch.zeros(1, 4, 32)
    idx = torch.zeros(1, dtype=torch.int64)
    no_map = torch.empty(0, dtype=torch.int64)
    table = torch.tensor([[1, 2, 9, 3]])  # slot 9 is past the 8-slot pool
    with pytest.raises(RuntimeError, match="outside the pool"):
        torch.ops.swakv.paged_decode(q, pool, pool, table, idx, idx, idx + 4, no_map, 1, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="outside the pool"):  # page 4 // 2 = 2 past the map
        torch.ops.swakv.paged_decode(q, pool, pool, torch.tensor([[4]]), idx, idx, idx + 1,
                                     torch.tensor([0, 1]), 2, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="key range"):
        torch.ops.swakv.paged_decode(q, pool, pool, table, idx, idx, idx + 5, no_map, 1, 1.0, 0.0)
    out = torch.ops.swakv.paged_decode(q, pool, pool, table, idx, idx, idx + 2, no_map, 1, 1.0, 0.0)
    assert out.shape == (1, 128) and (out == 0).all()


@pytest.mark.parametrize("heads, kv_heads, dim", [(4, 1, 256), (4, 1, 64), (8, 4, 64), (4, 2, 128),
                                                  (3, 1, 64)])
@pytest.mark.parametrize("softcap", [0.0, 3.0])
def test_paged_decode_bf16_fast_paths_track_fp32(heads: int, kv_heads: int, dim: int,
                                                 softcap: float) -> None:
    """bf16 paged_decode (4-key QK blocks for 4 heads per KV head, key-pair PV for up to 4,
    the generic loops otherwise) against an fp32 reference, for key counts that leave
    every tail (n mod 4), cross the 256-key chunks, and through a page map."""
    assert cpu_build.cpu_kernels_available()
    g = torch.Generator().manual_seed(heads * 100 + dim)
    lengths = [1, 2, 3, 5, 8, 255, 257, 301, 600]
    page, num_pages = 4, 1400  # 9 x 600 full slots: 1,350 pages
    pool_k = torch.randn(num_pages * page, kv_heads, dim, generator=g).to(torch.bfloat16)
    pool_v = torch.randn(num_pages * page, kv_heads, dim, generator=g).to(torch.bfloat16)
    q = torch.randn(len(lengths), heads, dim, generator=g).to(torch.bfloat16)
    width = max(lengths)
    # full slots 0 .. width * B, mapped page by page onto a shuffled pool
    table = torch.arange(len(lengths) * width).view(len(lengths), width)
    page_map = torch.randperm(num_pages, generator=g)[: table.numel() // page + 1]
    rows = torch.arange(len(lengths))
    key_hi = torch.tensor(lengths)
    key_lo = (key_hi - 270).clamp(min=0)  # long rows see a window of 270 keys
    out = torch.ops.swakv.paged_decode(q, pool_k, pool_v, table, rows, key_lo, key_hi, page_map,
                                       page, 0.3, softcap)
    group = heads // kv_heads
    for b in range(len(lengths)):
        full = table[b, key_lo[b] : key_hi[b]]
        slots = page_map[full // page] * page + full % page
        k, v = pool_k[slots].float(), pool_v[slots].float()  # [n, kvh, D]
        for h in range(heads):
            s = (k[:, h // group] @ q[b, h].float()) * 0.3
            if softcap:
                s = torch.tanh(s / softcap) * softcap
            ref = torch.softmax(s, 0) @ v[:, h // group]
            got = out[b, h * dim : (h + 1) * dim].float()
            torch.testing.assert_close(got, ref, atol=1e-2, rtol=1e-2)
