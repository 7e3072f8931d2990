"""Differential tests: our Gemma 3 over the hybrid pools vs transformers (fp32, eager).

Every pool slot starts as NaN (padding page 0 and every unmapped slot included),
SWA pages are poisoned again as soon as they are freed, and freed pages are handed
to a garbage-writing request: any read outside a sliding window, or of a slot the
forward did not write, turns the logits into NaN.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from swakv.config import KVLayout
from swakv.engine.runner import BatchItem, ModelRunner
from swakv.memory import KVPool, ReqTable, SWAAllocator, max_frontier
from swakv.model.gemma3 import Gemma3Model
from swakv.model.loader import LoadedModel, load_model_dir
from swakv.model.testing import load_hf_reference, make_tiny_gemma3_dir

TOL = 1e-4
CONFIGS = {
    # 6 layers s s f s s f, window 8, GQA 4:2
    "w8": dict(num_layers=6, window=8, sliding_pattern=3, seed=1),
    # 5 layers f s s s f, window 16, MQA, linear RoPE scaling on full layers, final
    # softcap (HF Gemma 3 ignores attn_logit_softcapping, so it is tested elsewhere)
    "w16": dict(
        num_layers=5,
        window=16,
        kv_heads=1,
        sliding_pattern="fsssf",
        rope_scaling_factor=2.0,
        final_logit_softcap=3.0,
        seed=2,
    ),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny matmuls: threading only adds OpenMP wake-up latency."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Tiny:
    """A tiny model dir, its spec/weights and the transformers oracle."""

    def __init__(self, path: Path) -> None:
        self.loaded: LoadedModel = load_model_dir(path)
        self.spec = self.loaded.spec
        self.window: int = self.spec.window  # type: ignore[assignment]
        self.hf = load_hf_reference(path)
        self.model = Gemma3Model(self.spec, self.loaded.weights)

    def ref_logits(self, ids: list[int]) -> torch.Tensor:
        """HF logits [len(ids), vocab] of one sequence."""
        with torch.no_grad():
            return self.hf(torch.tensor([ids])).logits[0].float()


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    path = make_tiny_gemma3_dir(tmp_path_factory.mktemp(request.param) / "m", **CONFIGS[request.param])
    return Tiny(path)


class Harness:
    """Pools, request table and runner at tiny sizes, with engine-like bookkeeping."""

    def __init__(
        self,
        tiny: Tiny,
        page: int,
        full_pages: int = 200,
        swa_pages: int = 200,
        validate: bool = True,
    ) -> None:
        self.page = page
        self.poisoned_pages = 0
        self.window = tiny.window
        self.alloc = SWAAllocator(full_pages // page + 1, swa_pages // page + 1, page)
        self.pool = KVPool(KVLayout.from_model(tiny.spec), self.alloc)
        self.table = ReqTable(num_rows=6, max_context=256)
        self.runner = ModelRunner(tiny.model, self.pool, self.table, validate=validate)
        self.lens: dict[int, int] = {}
        self.frontier: dict[int, int] = {}
        for t in self.pool.full_k + self.pool.full_v + self.pool.swa_k + self.pool.swa_v:
            t.fill_(float("nan"))

    def new_row(self) -> int:
        row = self.table.alloc_row()
        self.lens[row], self.frontier[row] = 0, 0
        return row

    def last_slot(self, row: int) -> int | None:
        n = self.lens[row]
        return int(self.table.slots[row, n - 1]) if n else None

    def extend_item(self, row: int, ids: list[int]) -> BatchItem:
        """Allocate positions [L, L + len(ids)) of `row` and return the batch item."""
        start = self.lens[row]
        slots = self.alloc.alloc_extend(start, start + len(ids), self.last_slot(row))
        self.table.write(row, start, slots)
        self.lens[row] = start + len(ids)
        return BatchItem(row, start, ids)

    def decode_items(self, rows: list[int], tokens: list[int]) -> list[BatchItem]:
        cur = torch.tensor([self.lens[r] for r in rows])
        last = torch.tensor([self.last_slot(r) for r in rows])
        slots = self.alloc.alloc_decode(cur, last)
        items = []
        for r, s, t in zip(rows, slots.tolist(), tokens):
            self.table.slots[r, self.lens[r]] = s
            items.append(BatchItem(r, self.lens[r], [t]))
            self.lens[r] += 1
        return items

    def share_prefix(self, src: int, dst: int, prefix_len: int) -> None:
        """Start row `dst` with `src`'s slots for positions [0, prefix_len) (page aligned)."""
        assert prefix_len % self.page == 0
        self.table.write(dst, 0, self.table.read(src, 0, prefix_len).clone())
        self.lens[dst] = prefix_len
        self.frontier[dst] = self.frontier[src]

    def free_swa_below(self, row: int, new_frontier: int) -> None:
        """Free the SWA pages of [frontier, new_frontier) and poison them."""
        old = self.frontier[row]
        if new_frontier <= old:
            return
        full = self.table.read(row, old, new_frontier)
        mapped = self.alloc.is_swa_mapped(full)
        swa_pages = torch.unique(self.alloc.translate(full[mapped]) // self.page)
        self.alloc.free_swa(full)
        self._poison_swa_pages(swa_pages)
        self.frontier[row] = new_frontier

    def advance_frontier(self, row: int) -> None:
        self.free_swa_below(row, max_frontier(self.lens[row], self.window, self.page))

    def _poison_swa_pages(self, pages: torch.Tensor) -> None:
        slots = (pages[:, None] * self.page + torch.arange(self.page)[None, :]).reshape(-1)
        self.poisoned_pages += int(pages.numel())
        for t in self.pool.swa_k + self.pool.swa_v:
            t[slots] = float("nan")

    def garbage_request(self) -> None:
        """Take every free SWA page (freed ones included), write garbage, free it all."""
        n = min(self.alloc.full_available(), self.alloc.swa_available())
        if n == 0:
            return
        full = self.alloc.alloc(n)
        swa = self.alloc.translate(full)
        for t in self.pool.full_k + self.pool.full_v:
            t[full] = 1e30
        for t in self.pool.swa_k + self.pool.swa_v:
            t[swa] = float("nan")
        self.alloc.free(full)
        self.alloc.check_integrity()


def _random_ids(n: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


def _assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert torch.isfinite(ours).all(), "non-finite logits: a poisoned slot was read"
    err = (ours - ref).abs().max().item()
    assert err < TOL, f"max abs logit error {err}"


@pytest.mark.parametrize("page", [1, 4])
@pytest.mark.parametrize("chunk", [None, 5, 16])
def test_prefill_whole_and_chunked(tiny: Tiny, page: int, chunk: int | None) -> None:
    """Every position of a 4W prompt; chunked prefill frees SWA behind the frontier."""
    h = Harness(tiny, page)
    ids = _random_ids(4 * tiny.window, tiny.spec.vocab_size, seed=page)
    row = h.new_row()
    step = chunk or len(ids)
    logits = []
    for s in range(0, len(ids), step):
        out = h.runner.forward([h.extend_item(row, ids[s : s + step])], return_all_logits=True)
        assert out.all_logits is not None
        torch.testing.assert_close(out.last_logits[0], out.all_logits[0][-1])
        logits.append(out.all_logits[0])
        h.advance_frontier(row)
        h.garbage_request()
    _assert_close(torch.cat(logits), tiny.ref_logits(ids))


@pytest.mark.parametrize("page", [1, 4])
def test_extend_on_shared_prefix_mixed_with_decode(tiny: Tiny, page: int) -> None:
    """B reuses A's prefix KV from the pools; B's extend runs in a batch with A's decode."""
    w, vocab = tiny.window, tiny.spec.vocab_size
    h = Harness(tiny, page)
    seq_a = _random_ids(4 * w, vocab, seed=10)
    prefix = 2 * w + 4  # page aligned for pages 1 and 4
    seq_b = seq_a[:prefix] + _random_ids(2 * w - 3, vocab, seed=11)
    a = h.new_row()
    h.runner.forward([h.extend_item(a, seq_a[: 3 * w])])
    # the tree would keep one window of SWA before the shared prefix end
    h.free_swa_below(a, max_frontier(prefix, w, page))
    h.garbage_request()
    b = h.new_row()
    h.share_prefix(a, b, prefix)
    items = [h.extend_item(b, seq_b[prefix:]), *h.decode_items([a], [seq_a[3 * w]])]
    out = h.runner.forward(items, return_all_logits=True)
    assert out.all_logits is not None
    _assert_close(out.all_logits[0], tiny.ref_logits(seq_b)[prefix:])
    _assert_close(out.all_logits[1], tiny.ref_logits(seq_a)[3 * w : 3 * w + 1])
    torch.testing.assert_close(out.last_logits[1], out.all_logits[1][-1])


@pytest.mark.parametrize("page", [1, 4])
def test_decode_with_advancing_frontier(tiny: Tiny, page: int) -> None:
    """Three requests of different lengths decode together (teacher forced) to 4W."""
    _decode_scenario(tiny, Harness(tiny, page))


def test_poisoned_slots_are_never_read_without_validation(tiny: Tiny) -> None:
    """Same scenario with the runner's mapping checks off: only the gathers protect us.

    Checks that the poison is really there: padding page 0 of both pools and every
    SWA page freed behind a frontier hold NaN while requests keep decoding.
    """
    h = Harness(tiny, page=4, validate=False)
    _decode_scenario(tiny, h)
    for t in h.pool.swa_k + h.pool.swa_v + h.pool.full_k + h.pool.full_v:
        assert torch.isnan(t[: h.page]).all()
    assert h.poisoned_pages > 0


def _decode_scenario(tiny: Tiny, h: Harness) -> None:
    w, vocab = tiny.window, tiny.spec.vocab_size
    total = 4 * w
    seqs = [_random_ids(total, vocab, seed=20 + i) for i in range(3)]
    refs = [tiny.ref_logits(s) for s in seqs]
    rows = [h.new_row() for _ in seqs]
    prompt_lens = [3, w + 3, 2 * w + 1]
    out = h.runner.forward([h.extend_item(r, s[:n]) for r, s, n in zip(rows, seqs, prompt_lens)])
    for r, ref, n in zip(rows, refs, prompt_lens):
        _assert_close(out.last_logits[rows.index(r)], ref[n - 1])
    step = 0
    while True:
        live = [i for i, r in enumerate(rows) if h.lens[r] < total]
        if not live:
            break
        toks = [seqs[i][h.lens[rows[i]]] for i in live]
        positions = [h.lens[rows[i]] for i in live]
        out = h.runner.forward(h.decode_items([rows[i] for i in live], toks))
        for j, i in enumerate(live):
            _assert_close(out.last_logits[j], refs[i][positions[j]])
        step += 1
        if step % 3 == 0:  # amortised frontier advance, then reuse of the freed pages
            for r in rows:
                h.advance_frontier(r)
            h.garbage_request()
    assert all(h.frontier[r] > 0 for r in rows)
    h.alloc.check_integrity()


def test_greedy_continuation_matches_generate(tiny: Tiny) -> None:
    """64 greedy tokens for two prompts decoded as one batch equal HF generate."""
    from transformers import GenerationConfig

    w, vocab = tiny.window, tiny.spec.vocab_size
    prompts = [_random_ids(n, vocab, seed=30 + n) for n in (5, w + 2)]
    cfg = GenerationConfig(do_sample=False, max_new_tokens=64, eos_token_id=None, pad_token_id=0)
    expected = []
    for p in prompts:
        ids = torch.tensor([p])
        with torch.no_grad():  # explicit mask: generate would treat token 0 as padding
            gen = tiny.hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
        expected.append(gen[0, len(p) :].tolist())
        assert len(expected[-1]) == 64
    h = Harness(tiny, page=4)
    rows = [h.new_row() for _ in prompts]
    out = h.runner.forward([h.extend_item(r, p) for r, p in zip(rows, prompts)])
    got: list[list[int]] = [[] for _ in prompts]
    for step in range(64):
        nxt = out.last_logits.argmax(dim=-1).tolist()
        for g, t in zip(got, nxt):
            g.append(t)
        if step == 63:
            break
        out = h.runner.forward(h.decode_items(rows, nxt))
        if step % 4 == 0:
            for r in rows:
                h.advance_frontier(r)
            h.garbage_request()
    assert got == expected


def test_logit_rows_pick_items_and_empty_rows_skip_the_lm_head(
        tiny: Tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    """`logit_rows` returns the chosen items' last logits in the order asked; `()` writes
    the KV of a chunk without running the LM head, and the next chunk still matches."""
    w, vocab = tiny.window, tiny.spec.vocab_size
    h = Harness(tiny, page=4)
    free_at_start = (h.alloc.full_available(), h.alloc.swa_available())

    def check() -> None:
        h.alloc.check_integrity()
        h.pool.check_integrity()

    seqs = [_random_ids(3 * w, vocab, seed=40 + i) for i in range(3)]
    refs = [tiny.ref_logits(s) for s in seqs]
    rows = [h.new_row() for _ in seqs]
    lens = [5, w + 2, 2 * w - 1]
    out = h.runner.forward([h.extend_item(r, s[:n]) for r, s, n in zip(rows, seqs, lens)],
                           logit_rows=[2, 0])
    check()
    assert out.last_logits is not None and out.last_logits.shape[0] == 2
    _assert_close(out.last_logits[0], refs[2][lens[2] - 1])
    _assert_close(out.last_logits[1], refs[0][lens[0] - 1])

    heads = []
    real_logits, real_greedy = tiny.model.compute_logits, tiny.model.greedy_tokens
    monkeypatch.setattr(tiny.model, "compute_logits", lambda *a, **k: heads.append(1) or real_logits(*a, **k))
    monkeypatch.setattr(tiny.model, "greedy_tokens", lambda *a, **k: heads.append(1) or real_greedy(*a, **k))
    chunk = [h.extend_item(r, s[n : n + 3]) for r, s, n in zip(rows, seqs, lens)]
    skipped = h.runner.forward(chunk, logit_rows=())
    check()
    greedy = h.runner.forward([h.extend_item(r, s[n + 3 : n + 5]) for r, s, n in zip(rows, seqs, lens)],
                              greedy_rows=())
    check()
    assert skipped.last_logits is None and skipped.all_logits is None
    assert greedy.greedy_token_ids is not None and greedy.greedy_token_ids.numel() == 0
    assert heads == []  # neither call ran the LM head
    out = h.runner.forward([h.extend_item(r, s[n + 5 : n + 7]) for r, s, n in zip(rows, seqs, lens)],
                           logit_rows=[1])
    check()
    assert heads == [1]
    _assert_close(out.last_logits[0], refs[1][lens[1] + 6])
    for r in rows:  # no frontier moved: each row's full slots free its SWA too
        h.alloc.free(h.table.read(r, 0, h.lens[r]))
    check()
    assert (h.alloc.full_available(), h.alloc.swa_available()) == free_at_start
