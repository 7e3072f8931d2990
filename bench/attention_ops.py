"""Microbenchmarks of attention over the hybrid KV pools (Gemma 3 270M shapes).

Shapes: 4 query heads, 1 KV head, head_dim 256, W = 512, page 16, bf16 (or --dtype
float32). Rows are allocated in interleaved 64-token chunks so their pages are scattered,
and SWA pages below each row's frontier are freed, as in a running engine.

Cases (each times one full layer and one sliding layer; `step` = metadata + 3 full +
15 sliding layers, Gemma 3 270M's mix):
- decode_b1_{1k,8k,24k}: one request decoding at that context;
- decode_b64_1.5k: 64 requests decoding, contexts uniform in [1k, 2k);
- prefill_1024_p{0,4k}: one chunk of 1,024 new tokens after a prefix of 0 / 4,096.

Columns: metadata ms (once per forward), full / sliding layer ms (`attend`: KV write +
attention), GFLOPS (4 * heads * head_dim * visible query-key pairs / time) and GB/s
(visible K+V bytes / time). Timings take the median of --reps runs.

    python bench/attention_ops.py [--impl auto|blocks|torch] [--threads 2] [--reps 20]
                                  [--out bench/results/attention_ops.json]

`--e2e` instead times whole engine steps on the real model in bf16 (build_engine +
add_request + step, prefix cache off): one request decoding at 1k and at 24k context
(its prefill time too), and 64 requests (contexts in [1k, 2k)) decoding together.
It uses only the engine's public API, so it also runs against other checkouts.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from swakv.config import AttentionSpec, AttnKind, KVLayout
from swakv.memory import KVPool, ReqTable, SWAAllocator
from swakv.memory.pages import max_frontier
from swakv.model import attention

PAGE, WINDOW, HEADS, KV_HEADS, DIM = 16, 512, 4, 1, 256
NUM_FULL_LAYERS, NUM_SLIDING_LAYERS = 3, 15
CHUNK = 64  # tokens per interleaved allocation round


def make_rows(lens: list[int], dtype: torch.dtype, seed: int = 0):
    """Allocator, pool (layer 0 full, layer 1 sliding) and table holding `lens` positions."""
    total = sum(lens)
    alloc = SWAAllocator(total // PAGE + 4 * len(lens) + 8, total // PAGE + 4 * len(lens) + 8, PAGE)
    layout = KVLayout(
        (
            AttentionSpec(AttnKind.FULL, KV_HEADS, DIM, 1e6),
            AttentionSpec(AttnKind.SLIDING, KV_HEADS, DIM, 1e4, window=WINDOW),
        ),
        dtype,
    )
    pool = KVPool(layout, alloc)
    g = torch.Generator().manual_seed(seed)
    for t in pool.full_k + pool.full_v + pool.swa_k + pool.swa_v:
        t.copy_(torch.randn(t.shape, generator=g).to(dtype))
    table = ReqTable(num_rows=len(lens), max_context=max(lens))
    rows = [table.alloc_row() for _ in lens]
    done = [0] * len(lens)
    while any(d < n for d, n in zip(done, lens)):
        for i, n in enumerate(lens):
            if done[i] < n:
                end = min(n, done[i] + CHUNK)
                last = int(table.slots[rows[i], done[i] - 1]) if done[i] else None
                table.write(rows[i], done[i], alloc.alloc_extend(done[i], end, last))
                done[i] = end
    for r, n in zip(rows, lens):
        alloc.free_swa(table.read(r, 0, max_frontier(n - 1, WINDOW, PAGE)))
    return alloc, pool, table, rows


def visible_pairs(items: list[tuple[int, int, int]], window: int | None) -> int:
    total = 0
    for _, p, n in items:
        for pos in range(p, p + n):
            total += pos + 1 if window is None else min(pos + 1, window)
    return total


def visible_rows(items: list[tuple[int, int, int]], window: int | None) -> int:
    total = 0
    for _, p, n in items:
        end = p + n
        total += end if window is None else min(end, window + n - 1)
    return total


def median_ms(fn: Callable[[], object], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def run_case(name: str, lens: list[int], new: list[int], dtype: torch.dtype, reps: int) -> dict:
    alloc, pool, table, rows = make_rows(lens, dtype)
    items = [(r, n - k, k) for r, n, k in zip(rows, lens, new)]
    num_tokens = sum(new)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(num_tokens, HEADS, DIM, generator=g).to(dtype)
    k = torch.randn(num_tokens, KV_HEADS, DIM, generator=g).to(dtype)
    v = torch.randn(num_tokens, KV_HEADS, DIM, generator=g).to(dtype)

    def meta() -> attention.AttentionMetadata:
        return attention.build_attention_metadata(items, table.slots, alloc, WINDOW)

    m = meta()
    scale = DIM**-0.5
    row: dict = {"case": name, "batch": len(lens), "new_tokens": num_tokens}
    row["meta_ms"] = median_ms(meta, reps)
    for layer, kind, window in ((0, "full", None), (1, "sliding", WINDOW)):
        plan = m.full if window is None else m.sliding
        ms = median_ms(lambda lr=layer, pl=plan: attention.attend(lr, q, k, v, pl, pool, scale), reps)
        pairs = visible_pairs(items, window)
        nbytes = visible_rows(items, window) * KV_HEADS * DIM * 2 * pool.full_k[0].element_size()
        row[f"{kind}_ms"] = ms
        row[f"{kind}_gflops"] = 4 * HEADS * DIM * pairs / ms / 1e6
        row[f"{kind}_gbps"] = nbytes / ms / 1e6
    row["step_ms"] = row["meta_ms"] + NUM_FULL_LAYERS * row["full_ms"] + NUM_SLIDING_LAYERS * row["sliding_ms"]
    return row


CASES = {
    "decode_b1_1k": ([1024], [1]),
    "decode_b1_8k": ([8192], [1]),
    "decode_b1_24k": ([24576], [1]),
    "decode_b64_1.5k": (None, None),  # filled in main (seeded lengths)
    "prefill_1024_p0": ([1024], [1024]),
    "prefill_1024_p4k": ([5120], [1024]),
}


def e2e_case(engine, prompts: list[list[int]], steps: int) -> dict:
    """Prefill `prompts` (timed), then time `steps` decode steps; median ms per step."""
    from swakv.sampling_params import SamplingParams

    # long enough that no request finishes before the timed steps (aborted after)
    params = SamplingParams(temperature=0.0, max_tokens=4096, ignore_eos=True)
    reqs = [engine.add_request(p, params) for p in prompts]
    t0 = time.perf_counter()
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in reqs):
        engine.step()
    prefill_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t1 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t1)
    for r in reqs:
        engine.abort(r.request_id)
    tokens = sum(len(p) for p in prompts)
    return {"batch": len(prompts), "context": tokens // len(prompts), "prefill_s": prefill_s,
            "prefill_tok_s": tokens / prefill_s, "decode_step_ms": statistics.median(times) * 1e3}


def run_e2e(threads: int, names: list[str], out: Path) -> None:
    from swakv.config import EngineConfig
    from swakv.engine.build import build_engine

    cfg = EngineConfig(dtype="bfloat16", kv_memory=3 << 30, num_threads=threads,
                       enable_prefix_cache=False, max_running_requests=64)
    engine = build_engine(None, cfg)
    g = torch.Generator().manual_seed(0)
    vocab = engine.spec.vocab_size

    def prompt(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=g).tolist()

    b64 = torch.randint(1024, 2048, (64,), generator=g).tolist()
    cases = {"decode_b1_1k": ([prompt(1024)], 10), "decode_b1_24k": ([prompt(24576)], 10),
             "decode_b64_1.5k": ([prompt(n) for n in b64], 5)}
    results = []
    with torch.inference_mode():
        for name in names:
            prompts, steps = cases[name]
            results.append({"case": name, **e2e_case(engine, prompts, steps)})
            print(results[-1], flush=True)
    print(f"{'case':<18}{'prefill_tok_s':>15}{'decode_step_ms':>16}")
    for r in results:
        print(f"{r['case']:<18}{r['prefill_tok_s']:>15.0f}{r['decode_step_ms']:>16.2f}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": {"threads": threads, "torch": torch.__version__},
                               "results": results}, indent=2))
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impl", choices=["auto", "blocks", "torch"], default="auto",
                    help="auto: swakv's kernels (bf16 prefill fused); blocks: the same with "
                         "bf16 prefill on the per-block kernels; torch: no C++ kernels")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--out", default="bench/results/attention_ops.json")
    ap.add_argument("--e2e", action="store_true", help="time engine steps on the real model")
    ap.add_argument("--e2e-cases", default="decode_b1_1k,decode_b1_24k,decode_b64_1.5k")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.e2e:
        run_e2e(args.threads, args.e2e_cases.split(","), Path(args.out))
        return
    dtype = getattr(torch, args.dtype)
    if hasattr(attention, "set_backend"):
        attention.set_backend("auto" if args.impl == "blocks" else args.impl)
    if args.impl == "blocks":
        attention._flash_fits = lambda dim: False
    g = torch.Generator().manual_seed(0)
    b64 = torch.randint(1024, 2048, (64,), generator=g).tolist()
    results = []
    with torch.inference_mode():
        for name in args.cases.split(","):
            lens, new = CASES[name]
            if lens is None:
                lens, new = b64, [1] * 64
            results.append(run_case(name, lens, new, dtype, args.reps))
    cols = ["meta_ms", "full_ms", "full_gflops", "full_gbps", "sliding_ms", "sliding_gflops",
            "sliding_gbps", "step_ms"]
    print(f"impl={args.impl} dtype={args.dtype} threads={args.threads}")
    print(f"{'case':<18}" + "".join(f"{c:>15}" for c in cols))
    for r in results:
        print(f"{r['case']:<18}" + "".join(f"{r[c]:>15.2f}" for c in cols))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"impl": args.impl, "dtype": args.dtype, "threads": args.threads, "reps": args.reps,
            "torch": torch.__version__, "machine": platform.processor() or platform.machine()}
    out.write_text(json.dumps({"config": meta, "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
