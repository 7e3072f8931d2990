"""The real Gemma 3 270M (dequantized GGUF) on the pools vs transformers, both fp32.

Prompts of ~1,500 tokens (about 3x the 512 window) of real text; 64 greedy tokens
must be identical to transformers `generate` (eager attention, KV cache) on the same
converted HF dir, and the logits of every step (the last prompt position included)
must agree within 1e-3. The SWA frontier advances and freed pages are poisoned
while decoding.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch

from swakv.config import KVLayout
from swakv.engine.runner import BatchItem, ModelRunner
from swakv.memory import KVPool, ReqTable, SWAAllocator, max_frontier
from swakv.model.gemma3 import Gemma3Model
from swakv.model.loader import load_model_dir, resolve_model
from swakv.model.testing import load_hf_reference
from swakv.model.tokenizer import load_tokenizer

pytestmark = pytest.mark.slow

NEW = 64
PAGE = 16
LOGIT_TOL = 1e-3
PROMPT_LENS = (1500, 1400, 1300, 1550)
SOURCES = ("argparse", "collections", "json", "inspect", "pathlib", "typing", "dataclasses")


@dataclass
class Setup:
    spec: object
    model: Gemma3Model
    prompts: list[list[int]]
    hf_tokens: list[list[int]]
    hf_logits: list[torch.Tensor]  # [NEW, vocab] per prompt: step t predicts token t


def _text_prompts(tokenizer: object) -> list[list[int]]:
    """Four different prompts of real English/code text, lengths PROMPT_LENS."""
    import importlib

    prompts = []
    for i, n in enumerate(PROMPT_LENS):
        text, ids = "", []
        for name in SOURCES[i:] + SOURCES[:i]:
            text += inspect.getsource(importlib.import_module(name)) + "\n"
            ids = tokenizer.encode(text)  # type: ignore[attr-defined]
            if len(ids) >= n:
                break
        assert len(ids) >= n
        prompts.append(ids[:n])
    return prompts


@pytest.fixture(scope="module")
def setup() -> Iterator[Setup]:
    from transformers import GenerationConfig

    path = resolve_model(None)
    loaded = load_model_dir(path)
    prompts = _text_prompts(load_tokenizer(path))
    hf = load_hf_reference(path)
    cfg = GenerationConfig(
        do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW, eos_token_id=None,
        pad_token_id=loaded.spec.pad_token_id, output_logits=True, return_dict_in_generate=True,
    )
    hf_tokens, hf_logits = [], []
    for p in prompts:
        ids = torch.tensor([p])
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
        hf_tokens.append(out.sequences[0, len(p) :].tolist())
        hf_logits.append(torch.cat([step.float() for step in out.logits]))
    del hf
    model = Gemma3Model(loaded.spec, loaded.weights, dtype=torch.float32)
    yield Setup(loaded.spec, model, prompts, hf_tokens, hf_logits)


def _generate(setup: Setup, prompts: list[list[int]]) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy NEW tokens for `prompts` as one batch; frontier advanced every 16 steps."""
    spec = setup.model.spec
    window = spec.window
    assert window is not None
    longest = max(len(p) for p in prompts) + NEW
    pages = len(prompts) * (longest // PAGE + 2)
    alloc = SWAAllocator(pages, pages, PAGE)
    pool = KVPool(KVLayout.from_model(spec), alloc)
    for t in pool.full_k + pool.full_v + pool.swa_k + pool.swa_v:
        t.fill_(float("nan"))
    table = ReqTable(len(prompts), longest + PAGE)
    runner = ModelRunner(setup.model, pool, table, validate=True)
    rows = [table.alloc_row() for _ in prompts]
    for r, p in zip(rows, prompts):
        table.write(r, 0, alloc.alloc(len(p)))
    frontier = [0] * len(prompts)
    lens = torch.tensor([len(p) for p in prompts])
    out = runner.forward([BatchItem(r, 0, p) for r, p in zip(rows, prompts)])
    tokens: list[list[int]] = [[] for _ in prompts]
    logits: list[list[torch.Tensor]] = [[] for _ in prompts]
    for step in range(NEW):
        nxt = out.last_logits.argmax(dim=-1).tolist()
        for i, t in enumerate(nxt):
            tokens[i].append(t)
            logits[i].append(out.last_logits[i])
        if step == NEW - 1:
            break
        if step % 16 == 0:
            for i, r in enumerate(rows):
                new_frontier = max_frontier(int(lens[i]), window, PAGE)
                if new_frontier > frontier[i]:
                    full = table.read(r, frontier[i], new_frontier)
                    swa = alloc.translate(full)
                    alloc.free_swa(full)
                    for t in pool.swa_k + pool.swa_v:
                        t[swa] = float("nan")
                    frontier[i] = new_frontier
        slots = alloc.alloc_decode(lens, table.slots[rows, lens - 1])
        table.slots[rows, lens] = slots
        out = runner.forward([BatchItem(r, int(n), [t]) for r, n, t in zip(rows, lens.tolist(), nxt)])
        lens = lens + 1
    assert all(f > 0 for f in frontier)
    return tokens, [torch.stack(step_logits) for step_logits in logits]


def _check(setup: Setup, which: list[int]) -> None:
    before = torch.get_num_threads()
    tokens, logits = _generate(setup, [setup.prompts[i] for i in which])
    torch.set_num_threads(before)
    for j, i in enumerate(which):
        assert tokens[j] == setup.hf_tokens[i], f"prompt {i}: greedy tokens differ"
        last_prompt_err = (logits[j][0] - setup.hf_logits[i][0]).abs().max().item()
        assert last_prompt_err < LOGIT_TOL, f"prompt {i}: last-position logit error {last_prompt_err}"
        err = (logits[j] - setup.hf_logits[i]).abs().max().item()
        assert err < LOGIT_TOL, f"prompt {i}: decode logit error {err}"


def test_single_prompt_matches_transformers(setup: Setup) -> None:
    _check(setup, [0])


def test_batch_of_four_prompts_matches_transformers(setup: Setup) -> None:
    _check(setup, [0, 1, 2, 3])
