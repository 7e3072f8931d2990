"""swakv's Gemma 3 runner vs transformers `generate`, same weights, one process.

Measures (greedy, median of --repeats runs each):
- decode:   single stream, 32-token prompt + 128 new tokens, tok/s = 128 / wall time
            (prefill of the 32 prompt tokens included, for both);
- prefill:  one 2,000-token prompt to its first token, tok/s = 2000 / wall time;
- batch16:  16 different 32-token prompts + 128 new tokens each, tok/s = 16*128 / time.
transformers runs in fp32 with its default SDPA attention and KV cache (its fastest
stock CPU path; bf16 eager/sdpa in transformers is slower on CPU for these shapes),
EOS disabled so that every run produces all tokens. swakv runs in --dtype (bf16
weights, activations and KV by default; float32 is the exact path).

Usage: python bench/model_vs_hf.py [--model DIR|GGUF] [--dtype bfloat16|float32]
       [--repeats 3] [--threads N] [--out bench/results/model_vs_hf.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from swakv.config import KVLayout, ModelSpec
from swakv.engine.runner import BatchItem, ModelRunner
from swakv.memory import KVPool, ReqTable, SWAAllocator
from swakv.model.gemma3 import Gemma3Model
from swakv.model.loader import load_model_dir, resolve_model

PROMPT, NEW, PREFILL, BATCH = 32, 128, 2000, 16
PAGE = 16
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def _prompts(num: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab, (num, length), generator=g).tolist()


class SwakvRunner:
    """Fresh pools per run; greedy generation straight on the ModelRunner."""

    def __init__(self, spec: ModelSpec, weights: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
        self.spec, self.dtype = spec, dtype
        self.model = Gemma3Model(spec, weights, dtype=dtype)

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        longest = max(len(p) for p in prompts) + new_tokens
        pages = len(prompts) * (-(-longest // PAGE) + 1)
        alloc = SWAAllocator(pages, pages, PAGE)
        pool = KVPool(KVLayout.from_model(self.spec, self.dtype), alloc)
        table = ReqTable(len(prompts), longest + PAGE)
        runner = ModelRunner(self.model, pool, table)
        rows, lens = [], []
        for p in prompts:
            row = table.alloc_row()
            table.write(row, 0, alloc.alloc(len(p)))
            rows.append(row)
            lens.append(len(p))
        out = runner.forward([BatchItem(r, 0, p) for r, p in zip(rows, prompts)])
        generated: list[list[int]] = [[] for _ in prompts]
        cur = torch.tensor(lens)
        for step in range(new_tokens):
            nxt = out.last_logits.argmax(dim=-1)
            for g, t in zip(generated, nxt.tolist()):
                g.append(t)
            if step == new_tokens - 1:
                break
            last = table.slots[rows, cur - 1]
            slots = alloc.alloc_decode(cur, last)
            table.slots[rows, cur] = slots
            out = runner.forward([BatchItem(r, int(c), [t]) for r, c, t in zip(rows, cur.tolist(), nxt.tolist())])
            cur = cur + 1
        return generated


class HFRunner:
    def __init__(self, path: Path) -> None:
        from transformers import Gemma3ForCausalLM, GenerationConfig

        self.model = Gemma3ForCausalLM.from_pretrained(
            str(path), dtype=torch.float32, attn_implementation="sdpa", local_files_only=True
        ).eval()
        self.config_cls = GenerationConfig

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        ids = torch.tensor(prompts)
        cfg = self.config_cls(
            do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            eos_token_id=None, pad_token_id=0,
        )
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
        return out[:, ids.shape[1] :].tolist()


def bench(
    runners: dict[str, Any], vocab: int, repeats: int
) -> tuple[dict[str, dict[str, float]], dict[str, list[int]]]:
    """Median tok/s per runner and workload; runs alternate between runners so that
    background load on the machine hits both alike."""
    single = _prompts(1, PROMPT, vocab, seed=1)
    workloads = {
        "decode_tok_s": (single, NEW, NEW),
        "prefill_tok_s": (_prompts(1, PREFILL, vocab, seed=2), 1, PREFILL),
        "batch16_decode_tok_s": (_prompts(BATCH, PROMPT, vocab, seed=3), NEW, BATCH * NEW),
    }
    for runner in runners.values():
        runner.generate(single, 4)  # warm-up (kernels, allocator)
    results: dict[str, dict[str, float]] = {name: {} for name in runners}
    tokens: dict[str, list[int]] = {}
    for key, (prompts, new_tokens, produced) in workloads.items():
        times: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(repeats):
            for name, runner in runners.items():
                t0 = time.perf_counter()
                out = runner.generate(prompts, new_tokens)
                times[name].append(time.perf_counter() - t0)
                if key == "decode_tok_s":
                    tokens[name] = out[0]
        for name in runners:
            results[name][key] = produced / statistics.median(times[name])
    return results, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model dir or .gguf (default: Gemma 3 270M)")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", default="bench/results/model_vs_hf.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    loaded = load_model_dir(path)
    vocab = loaded.spec.vocab_size
    ours_name, hf_name = f"swakv ({args.dtype})", "transformers (float32)"
    runners = {
        ours_name: SwakvRunner(loaded.spec, loaded.weights, DTYPES[args.dtype]),
        hf_name: HFRunner(path),
    }
    results, tokens = bench(runners, vocab, args.repeats)
    ours_tokens, hf_tokens = tokens[ours_name], tokens[hf_name]
    sa, sb = results[ours_name], results[hf_name]
    speedup = {k: sa[k] / sb[k] for k in sa}
    targets = {"decode_tok_s": 2.0, "prefill_tok_s": 1.0, "batch16_decode_tok_s": 3.0}
    same_prefix = next((i for i, (x, y) in enumerate(zip(ours_tokens, hf_tokens)) if x != y), NEW)
    print(f"{'':26s}{'decode tok/s':>14s}{'prefill tok/s':>15s}{'batch16 tok/s':>15s}")
    for name, r in results.items():
        print(f"{name:26s}{r['decode_tok_s']:14.1f}{r['prefill_tok_s']:15.1f}{r['batch16_decode_tok_s']:15.1f}")
    print(f"{'speedup':26s}" + "".join(f"{speedup[k]:>{w}.2f}x" for k, w in zip(targets, (13, 14, 14))))
    print(f"greedy tokens identical to transformers for the first {same_prefix}/{NEW} steps")
    report = {
        "model": str(path),
        "threads": args.threads,
        "repeats": args.repeats,
        "workload": {"prompt": PROMPT, "new_tokens": NEW, "prefill": PREFILL, "batch": BATCH},
        "results": results,
        "speedup": speedup,
        "targets": targets,
        "targets_met": {k: speedup[k] >= v for k, v in targets.items()},
        "greedy_identical_prefix": same_prefix,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
