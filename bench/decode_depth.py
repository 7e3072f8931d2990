"""Engine overhead against context depth: one request decoding at 1k, 8k and 32k.

For each depth D the real Gemma 3 270M (bf16, prefix cache on) prefills a D-token
prompt, then decodes; for each measured decode step the wall time of `step()` is
split into model time (`ModelRunner.forward`: metadata, forward, LM head) and engine
time (everything else: scheduling, cache commits, allocator, sampler, detokenising).
The goal: engine time per step at 32k within 1.5x of that at 1k (a page commit's cost
must not grow with the context).

    .venv/bin/python bench/decode_depth.py [--depths 1024,8192,32000] [--steps 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from swakv.config import EngineConfig
from swakv.engine.build import build_engine
from swakv.sampling_params import SamplingParams


def measure(depth: int, steps: int, chunk: int, threads: int) -> dict:
    cfg = EngineConfig(dtype="bfloat16", kv_memory=2 << 30, chunk_size=chunk,
                       max_running_requests=4, num_threads=threads)
    eng = build_engine(None, cfg)
    g = torch.Generator().manual_seed(depth)
    prompt = torch.randint(1000, 200_000, (depth,), generator=g).tolist()
    warm = 8
    req = eng.add_request(prompt, SamplingParams(temperature=0, max_tokens=warm + steps,
                                                 ignore_eos=True))
    model_s = [0.0]
    real = eng.runner.forward

    def timed(items, *a, **kw):
        t = time.perf_counter()
        out = real(items, *a, **kw)
        model_s[0] += time.perf_counter() - t
        return out

    eng.runner.forward = timed
    t0 = time.perf_counter()
    while req.num_output_tokens < warm:
        eng.step()
    prefill_s = time.perf_counter() - t0
    total, model = [], []
    while not req.is_finished:
        model_s[0] = 0.0
        t = time.perf_counter()
        eng.step()
        total.append(time.perf_counter() - t)
        model.append(model_s[0])
    engine = [a - b for a, b in zip(total, model)]
    ms = lambda xs: 1e3 * statistics.median(xs)  # noqa: E731
    return {"depth": depth, "prefill_s": prefill_s, "steps": len(total),
            "step_ms": ms(total), "model_ms": ms(model), "engine_ms": ms(engine),
            "engine_p90_ms": 1e3 * sorted(engine)[int(0.9 * (len(engine) - 1))],
            "tree_nodes": eng.cache.stats().num_nodes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--depths", default="1024,8192,32000")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/decode_depth.json")
    args = ap.parse_args()
    rows = [measure(int(d), args.steps, args.chunk, args.threads)
            for d in args.depths.split(",")]
    print(f"{'depth':>7} {'prefill s':>9} {'step ms':>8} {'model ms':>9} {'engine ms':>10} "
          f"{'engine p90':>10} {'nodes':>6}")
    for r in rows:
        print(f"{r['depth']:>7} {r['prefill_s']:>9.1f} {r['step_ms']:>8.2f} {r['model_ms']:>9.2f} "
              f"{r['engine_ms']:>10.3f} {r['engine_p90_ms']:>10.3f} {r['tree_nodes']:>6}")
    ratio = rows[-1]["engine_ms"] / rows[0]["engine_ms"]
    print(f"engine time at {rows[-1]['depth']} / at {rows[0]['depth']}: {ratio:.2f}x (goal <= 1.5x)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "engine_ratio": ratio,
                               "config": vars(args)}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
