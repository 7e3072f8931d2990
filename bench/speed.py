"""Engine speed per quantization mode on the real model (bf16 activations, 2 threads).

For each mode (`--modes none,int8,int4,w8a8`), in its own process (so peak RSS is that
mode's):
  decode1     single stream, 32-token prompt -> 128 tokens: decode tok/s (first to last token)
  prefill     one 2,000-token prompt to its first token: prompt tok/s
  batch8      8 x (200 -> 64) from submission to the last token: output tok/s, prefill included
  batch64     64 requests decoding together (short prompts): output tok/s over 32 steps
  gflops      effective GFLOPS of prefill and of batch-64 decode (FLOPs counted from the
              model's shapes: linears 2 x params per token, LM head per sampled token,
              attention 4 x heads x head_dim x visible keys per token per layer)
  rss         peak resident memory of the process (GiB)
  non-model   share of a decode step spent outside `ModelRunner.forward`, batch 1 and 64

Prints a table and writes JSON.

    .venv/bin/python bench/speed.py [--modes none,int8,int4,w8a8] [--out bench/results/speed.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from swakv.bench.flops import (
    attention_flops,
    attention_flops_range,
    head_flops_per_token,
    linear_flops_per_token,
)
from swakv.config import EngineConfig
from swakv.engine.build import build_engine
from swakv.engine.core import EngineCore
from swakv.sampling_params import SamplingParams


def prompt(vocab: int, n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1000, vocab - 10, (n,), generator=g).tolist()


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


class ForwardTimer:
    """Wall time spent in `ModelRunner.forward` (the model), per step."""

    def __init__(self, eng: EngineCore) -> None:
        self.seconds = 0.0
        real = eng.runner.forward

        def timed(*a, **kw):
            t = time.perf_counter()
            out = real(*a, **kw)
            self.seconds += time.perf_counter() - t
            return out

        eng.runner.forward = timed


def decode_steps(eng: EngineCore, timer: ForwardTimer, n: int) -> tuple[float, float]:
    """(median step s, median share outside the forward) over n decode steps."""
    total, outside = [], []
    for _ in range(n):
        timer.seconds = 0.0
        t = time.perf_counter()
        eng.step()
        dt = time.perf_counter() - t
        total.append(dt)
        outside.append((dt - timer.seconds) / dt)
    return statistics.median(total), statistics.median(outside)


def run_mode(mode: str, threads: int) -> dict:
    torch.set_num_threads(threads)
    cfg = EngineConfig(dtype="bfloat16", quantization=mode, kv_memory=2 << 30, chunk_size=2048,
                       max_running_requests=64, num_threads=threads, decode_reserve=64)
    eng = build_engine(None, cfg)
    timer = ForwardTimer(eng)
    vocab = eng.spec.vocab_size
    lin, head = linear_flops_per_token(eng.spec), head_flops_per_token(eng.spec)
    out: dict = {"mode": mode}

    # warm-up (kernel build, caches)
    r = eng.add_request(prompt(vocab, 64, 0), greedy(4))
    while not r.is_finished:
        eng.step()

    # single stream decode: 32 -> 128
    r = eng.add_request(prompt(vocab, 32, 1), greedy(128))
    eng.step()  # prefill + first token
    t0 = time.perf_counter()
    while not r.is_finished:
        eng.step()
    out["decode1_tok_s"] = 127 / (time.perf_counter() - t0)

    # non-model share at batch 1 (context ~544)
    r = eng.add_request(prompt(vocab, 512, 2), greedy(64))
    eng.step()
    step1, share1 = decode_steps(eng, timer, 32)
    eng.abort(r.request_id)
    out["step_b1_ms"], out["non_model_b1"] = 1e3 * step1, share1

    # prefill of 2,000 tokens
    r = eng.add_request(prompt(vocab, 2000, 3), greedy(1))
    t0 = time.perf_counter()
    while not r.is_finished:
        eng.step()
    dt = time.perf_counter() - t0
    out["prefill_tok_s"] = 2000 / dt
    pf = 2000 * lin + head + attention_flops_range(eng.spec, 0, 2000)
    out["prefill_gflops"] = pf / dt / 1e9

    # batch 8: 8 x (200 -> 64), prefill included
    eng.flush_cache()
    reqs = [eng.add_request(prompt(vocab, 200, 10 + i), greedy(64)) for i in range(8)]
    t0 = time.perf_counter()
    while not all(x.is_finished for x in reqs):
        eng.step()
    out["batch8_tok_s"] = 8 * 64 / (time.perf_counter() - t0)

    # batch 64 decode
    eng.flush_cache()
    reqs = [eng.add_request(prompt(vocab, 100, 100 + i), greedy(80)) for i in range(64)]
    while any(x.is_prefilling or x.kv is None for x in reqs):
        eng.step()
    ctx = statistics.mean(len(x.token_ids) for x in reqs)
    step64, share64 = decode_steps(eng, timer, 32)
    out["batch64_tok_s"] = 64 / step64
    out["step_b64_ms"], out["non_model_b64"] = 1e3 * step64, share64
    dec = 64 * (lin + head + attention_flops(eng.spec, int(ctx) + 16))
    out["batch64_gflops"] = dec / step64 / 1e9
    for x in reqs:
        eng.abort(x.request_id)
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return out


COLUMNS = [("decode1_tok_s", "decode b1 tok/s"), ("prefill_tok_s", "prefill tok/s"),
           ("batch8_tok_s", "8x(200->64) tok/s"), ("batch64_tok_s", "decode b64 tok/s"),
           ("prefill_gflops", "prefill GFLOPS"), ("batch64_gflops", "b64 GFLOPS"),
           ("peak_rss_gib", "peak RSS GiB"), ("non_model_b1", "non-model b1"),
           ("non_model_b64", "non-model b64")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--modes", default="none,int8,int4,w8a8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # child: run one mode, print JSON
    ap.add_argument("--out", default="bench/results/speed.json")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_mode(args.one, args.threads)))
        return
    rows = []
    for mode in args.modes.split(","):
        proc = subprocess.run([sys.executable, __file__, "--one", mode, "--threads",
                               str(args.threads)], capture_output=True, text=True, check=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"{'mode':<8}" + "".join(f"{title:>19}" for _, title in COLUMNS))
    for r in rows:
        cells = []
        for key, _ in COLUMNS:
            v = r[key]
            cells.append(f"{100 * v:>18.1f}%" if key.startswith("non_model") else f"{v:>19.1f}")
        print(f"{r['mode']:<8}" + "".join(cells))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
