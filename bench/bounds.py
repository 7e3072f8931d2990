"""Upper bounds on what any engine can serve on this machine, against issue 14's targets.

Measures what the machine's best kernels reach here (torch's, 2 threads by default):
- bf16 GEMM (oneDNN, prepacked as swakv runs it) on the model's prefill shapes
  (1,024 rows through q/k/v, o, gate/up, down), the LM head at 64 rows and a square
  2,048^3 GEMM; the largest of these is the bf16 peak;
- int8 x int8 -> int32 GEMM (`torch._int_mm`, VNNI) on the same shapes: the int8 peak;
- read bandwidth: the faster of summing a 512 MiB float32 tensor and a one-row bf16
  GEMV over the LM head's weights (which streams them once).

Then counts the work of the benchmark workloads (swakv.bench.flops: weight matmuls,
LM head, attention over the visible keys; nothing else) with the best cache any engine
could have (chat: the system prompt computed once, every later turn computes only its
user message and the previous answer's last token), and divides:

    bound tok/s = output tokens / (work / peak)

for bf16 everywhere ("bf16") and for int8 matmuls with bf16 attention ("int8 mm"),
both assuming every kernel always runs at its peak, with zero time for anything else
(sampling, scheduling, HTTP): no engine can beat these on this machine. Single-stream
decode is bounded by the bytes each token must read (weights in each mode + KV) over
the read bandwidth.

With --peers (bench/peers.py's JSON), the targets (chat >= 2x vLLM-CPU, documents >=
1.5x, single stream >= 80 tok/s) and the engines' measured numbers are printed beside
the bounds, with each engine's share of the bf16 bound.

    flock /tmp/swakv-cpu.lock .venv/bin/python bench/bounds.py --peers bench/results/peers.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from swakv.bench.flops import (
    attention_flops_range,
    head_flops_per_token,
    linear_flops_per_token,
)
from swakv.bench.workload import ChatWorkload, DocsWorkload, TokenRange, docs_prompts
from swakv.config import ModelSpec
from swakv.model.loader import load_model_dir, resolve_model
from swakv.model.quant import DenseKernel

TARGETS = {"chat": 2.0, "docs": 1.5}  # x vLLM-CPU's measured output tok/s
SINGLE_STREAM_TARGET = 80.0


def best_seconds(fn: Callable[[], object], reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def gemm_shapes(spec: ModelSpec) -> dict[str, tuple[int, int, int]]:
    """name -> (rows M, out N, in K) of the GEMMs measured."""
    a = spec.layers[0]
    h, inter = spec.hidden_size, spec.intermediate_size
    return {
        "qkv x1024": (1024, (spec.num_heads + 2 * a.num_kv_heads) * a.head_dim, h),
        "o x1024": (1024, h, spec.num_heads * a.head_dim),
        "gate_up x1024": (1024, 2 * inter, h),
        "down x1024": (1024, h, inter),
        "lm_head x64": (64, spec.vocab_size, h),
        "square 2048": (2048, 2048, 2048),
    }


def _dense_seconds(m: int, n: int, k: int, reps: int) -> float:
    dense = DenseKernel(torch.randn(n, k), torch.bfloat16)
    x = torch.randn(m, k).to(torch.bfloat16)
    return best_seconds(lambda: dense(x), reps)


def _int8_seconds(m: int, n: int, k: int, reps: int) -> float:
    qw = torch.randint(-127, 128, (k, n), dtype=torch.int8)
    qx = torch.randint(-127, 128, (m, k), dtype=torch.int8)
    return best_seconds(lambda: torch._int_mm(qx, qw), reps)


def measure_peaks(spec: ModelSpec, reps: int) -> dict:
    """GFLOPS / GOPS per shape for bf16 and int8, and read GB/s."""
    rows = {}
    for name, (m, n, k) in gemm_shapes(spec).items():
        flop = 2.0 * m * n * k
        rows[name] = {"bf16_gflops": flop / _dense_seconds(m, n, k, reps) / 1e9,
                      "int8_gops": flop / _int8_seconds(m, n, k, reps) / 1e9}
    big = torch.ones(128 << 20, dtype=torch.float32)  # 512 MiB
    read_sum = big.numel() * 4 / best_seconds(lambda: big.sum(), reps) / 1e9
    # a bf16 GEMV over the LM head's weights streams them once: often faster than sum
    head = DenseKernel(torch.randn(spec.vocab_size, spec.hidden_size), torch.bfloat16)
    x = torch.randn(1, spec.hidden_size).to(torch.bfloat16)
    head_bytes = 2.0 * spec.vocab_size * spec.hidden_size
    read_gemv = head_bytes / best_seconds(lambda: head(x), reps) / 1e9
    read = max(read_sum, read_gemv)
    return {"shapes": rows, "bf16_peak": max(r["bf16_gflops"] for r in rows.values()),
            "int8_peak": max(r["int8_gops"] for r in rows.values()), "read_gb_s": read}


def docs_work(spec: ModelSpec, seed: int = 0) -> dict:
    """FLOPs of bench/peers.py's documents workload (16 x 3-6k prompts, 128 out each)."""
    w = DocsWorkload()
    lin, head = linear_flops_per_token(spec), head_flops_per_token(spec)
    mm = attn = 0.0
    for p in docs_prompts(w, TokenRange(), seed):
        n, out = len(p), w.output_len
        # prefill all n (head on the last row), then out - 1 decode steps
        mm += (n + out - 1) * lin + out * head
        attn += attention_flops_range(spec, 0, n + out - 1)
    return {"matmul": mm, "attention": attn, "output_tokens": w.num_docs * w.output_len}


def chat_work(spec: ModelSpec) -> dict:
    """FLOPs of the chat workload with the best possible prefix cache."""
    w = ChatWorkload()
    lin, head = linear_flops_per_token(spec), head_flops_per_token(spec)
    mm = attn = 0.0
    computed = w.system_len  # the shared system prompt, once
    mm += w.system_len * lin
    attn += attention_flops_range(spec, 0, w.system_len)
    for t in range(w.turns):
        prompt_len = w.system_len + t * (w.user_len + w.output_len) + w.user_len
        new = w.user_len + (1 if t else 0)  # + the previous answer's last token
        start = prompt_len - new
        per_session_mm = (new + w.output_len - 1) * lin + w.output_len * head
        per_session_attn = attention_flops_range(spec, start, prompt_len + w.output_len - 1)
        mm += w.sessions * per_session_mm
        attn += w.sessions * per_session_attn
        computed += w.sessions * (new + w.output_len - 1)
    return {"matmul": mm, "attention": attn, "computed_tokens": computed,
            "output_tokens": w.sessions * w.turns * w.output_len}


def throughput_bounds(work: dict, peaks: dict) -> dict:
    t_bf16 = (work["matmul"] + work["attention"]) / (peaks["bf16_peak"] * 1e9)
    t_int8 = work["matmul"] / (peaks["int8_peak"] * 1e9) + work["attention"] / (
        peaks["bf16_peak"] * 1e9)
    return {"bf16_tok_s": work["output_tokens"] / t_bf16,
            "int8_mm_tok_s": work["output_tokens"] / t_int8,
            "tflop": (work["matmul"] + work["attention"]) / 1e12}


def decode_bytes_per_token(spec: ModelSpec, context: int) -> dict[str, float]:
    """Bytes one batch-1 decode step must read, per weight format (KV in bf16)."""
    params = linear_flops_per_token(spec) / 2 + head_flops_per_token(spec) / 2
    kv = 0.0
    for a in spec.layers:
        keys = context if a.window is None else min(context, a.window)
        kv += 2 * keys * a.num_kv_heads * a.head_dim * 2
    # int8: 1 B + per-row fp32 scale (negligible); int4: 0.5 B + bf16 scale and zero per 32
    per_param = {"bf16": 2.0, "int8": 1.0, "int4": 0.5 + 4 / 32}
    return {mode: params * b + kv for mode, b in per_param.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--peers", default=None, help="bench/peers.py JSON with measured numbers")
    ap.add_argument("--out", default="bench/results/bounds.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    spec = load_model_dir(resolve_model(args.model)).spec
    peaks = measure_peaks(spec, args.reps)
    print(f"{'GEMM':<16}{'bf16 GFLOPS':>13}{'int8 GOPS':>11}")
    for name, r in peaks["shapes"].items():
        print(f"{name:<16}{r['bf16_gflops']:>13.0f}{r['int8_gops']:>11.0f}")
    print(f"peaks: bf16 {peaks['bf16_peak']:.0f} GFLOPS, int8 {peaks['int8_peak']:.0f} GOPS, "
          f"read {peaks['read_gb_s']:.1f} GB/s\n")

    measured = json.loads(Path(args.peers).read_text())["results"] if args.peers else {}
    vllm = measured.get("vllm", {})
    bounds = {"chat": throughput_bounds(chat_work(spec), peaks),
              "docs": throughput_bounds(docs_work(spec), peaks)}
    engines = [e for e in measured if "chat" in measured[e]]
    print(f"{'workload':<10}{'TFLOP':>7}{'bound bf16':>12}{'bound int8mm':>14}{'target':>9}"
          + "".join(f"{e:>16}" for e in engines))
    for name, b in bounds.items():
        target = TARGETS[name] * vllm[name]["output_tok_per_s"] if name in vllm else None
        b["target_tok_s"] = target
        cells = "".join(
            f"{measured[e][name]['output_tok_per_s']:>8.1f} ({measured[e][name]['output_tok_per_s'] / b['bf16_tok_s']:>4.0%})"
            for e in engines)
        tgt = f"{target:>9.1f}" if target else f"{'-':>9}"
        print(f"{name:<10}{b['tflop']:>7.2f}{b['bf16_tok_s']:>12.1f}{b['int8_mm_tok_s']:>14.1f}"
              f"{tgt}{cells}")
    print("(bound: output tok/s if every FLOP ran at the peak above and nothing else took "
          "time; measured: output tok/s (share of the bf16 bound))\n")

    single = {}
    for mode, nbytes in decode_bytes_per_token(spec, 160).items():
        single[mode] = {"mb_per_token": nbytes / 1e6,
                        "bound_tok_s": peaks["read_gb_s"] * 1e9 / nbytes}
    print(f"{'decode b1':<10}{'MB/token':>10}{'bound tok/s':>13}  (target {SINGLE_STREAM_TARGET:.0f})")
    for mode, s in single.items():
        print(f"{mode:<10}{s['mb_per_token']:>10.0f}{s['bound_tok_s']:>13.1f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": args.threads, "peaks": peaks, "throughput": bounds,
                               "single_stream": single, "peers": args.peers}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
