"""Linear-kernel timings per layer shape and row count: where each quantized mode's
kernels cross over (the numbers behind `swakv.model.quant.DISPATCH`).

For every linear shape of the model (qkv, o, gate_up, down, LM head) and every row
count M, the fastest of repeated calls of each kernel on random weights (speed does
not depend on the values) and bf16 activations:

    dense     oneDNN prepacked bf16 (the `none` path)
    int8      aten._weight_int8pack_mm (weight-only int8, per output channel)
    int8k     swakv.int8_group_mm on the same per-channel weights (one group of K)
    int8g     swakv.int8_group_mm on grouped int8 weights (groups of 32)
    int4-G    aten._weight_int4pack_mm_for_cpu, group size G
    w8a8      per-token int8 activation quantization + torch._int_mm + rescale

and, per mode, the smallest M from which the large-batch kernel is faster at this M
and every larger one measured (the crossover).

By default one weight per shape is called repeatedly, so weights that fit in the
caches are timed hot. `--cold` times what a decode step sees instead: one weight per
layer of the model, called in turn after a 64 MiB write that evicts them, the time
per call being the pass's over the number of layers (the LM head, larger than the
caches, is timed as by default).

    flock /tmp/swakv-cpu.lock .venv/bin/python bench/quant_kernels.py --threads 2
    .venv/bin/python bench/quant_kernels.py --cold --rows 1,2,3,4,6,8 --groups "" \
        --shapes qkv,o,gate_up,down --out bench/results/quant_kernels_cold.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from swakv.model.loader import load_model_dir, resolve_model
from swakv.model.quant import (
    DenseKernel,
    Int4WeightOnlyKernel,
    Int4Weights,
    Int8GroupKernel,
    Int8GroupWeights,
    Int8WeightOnlyKernel,
    Int8Weights,
    W8A8Kernel,
)

ROWS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 512, 1024)
HEAD_MAX_ROWS = 256  # the LM head sees one row per sequence (all rows only when scoring)


def time_call(fn: Callable[[], object], min_time: float) -> float:
    """Fastest seconds of one call (2 warm-up calls; at least 5 calls or min_time).

    The minimum, not the median: other jobs on the shared cores only ever add time.
    """
    fn()
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 5 or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 200:
            break
    return min(times)


def time_cold(calls: list[Callable[[], object]], flush: torch.Tensor, min_time: float) -> float:
    """Fastest seconds per call of a pass over `calls` in turn, `flush` overwritten
    before each pass (evicting their weights) and not timed; as `time_call` otherwise."""
    times: list[float] = []
    start = time.perf_counter()
    for i in range(202):
        flush.fill_(1.0)
        t0 = time.perf_counter()
        for call in calls:
            call()
        if i >= 2:
            times.append((time.perf_counter() - t0) / len(calls))
            if len(times) >= 5 and time.perf_counter() - start >= min_time:
                break
    return min(times)


def kernels(w: torch.Tensor, groups: tuple[int, ...]) -> dict[str, Callable]:
    dtype = torch.bfloat16
    i8 = Int8Weights.quantize(w)
    out: dict[str, Callable] = {
        "dense": DenseKernel(w, dtype),
        "int8": Int8WeightOnlyKernel(i8, dtype),
        "int8k": Int8GroupKernel(i8.as_groups(dtype), dtype),
        "int8g": Int8GroupKernel(Int8GroupWeights.quantize(w), dtype),
        "w8a8": W8A8Kernel(i8, dtype),
    }
    for g in groups:
        out[f"int4-{g}"] = Int4WeightOnlyKernel(Int4Weights.quantize(w, g), dtype)
    return out


def crossover(times: dict[int, dict[str, float]], small: str, large: str) -> int | None:
    """Smallest measured M from which `large` beats `small` at M and every larger M."""
    result = None
    for m in sorted(times, reverse=True):
        if times[m][large] < times[m][small]:
            result = m
        else:
            break
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-time", type=float, default=0.2, help="seconds per measurement")
    ap.add_argument("--groups", default="32,64,128", help="int4 group sizes to time")
    ap.add_argument("--shapes", default="qkv,o,gate_up,down,lm_head")
    ap.add_argument("--rows", default=",".join(map(str, ROWS)))
    ap.add_argument("--cold", action="store_true",
                    help="one weight per layer, evicted before each pass (decode's case)")
    ap.add_argument("--out", default="bench/results/quant_kernels.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    spec = load_model_dir(resolve_model(args.model)).spec
    attn = spec.layers[0]
    q_out = spec.num_heads * attn.head_dim
    kv_out = attn.num_kv_heads * attn.head_dim
    h, inter = spec.hidden_size, spec.intermediate_size
    shapes = {
        "qkv": (q_out + 2 * kv_out, h),
        "o": (h, q_out),
        "gate_up": (2 * inter, h),
        "down": (h, inter),
        "lm_head": (spec.vocab_size, h),
    }
    shapes = {k: v for k, v in shapes.items() if k in args.shapes.split(",")}
    rows = tuple(int(m) for m in args.rows.split(","))
    groups = tuple(int(g) for g in args.groups.split(",") if g)
    gen = torch.Generator().manual_seed(0)
    flush = torch.empty(16 * 1024 * 1024)  # 64 MiB, twice the largest L3 here
    results: dict[str, dict] = {}
    with torch.inference_mode():
        for name, (n, k) in shapes.items():
            copies = spec.num_layers if args.cold and name != "lm_head" else 1
            layer_ks = [kernels(torch.randn(n, k, generator=gen) * 0.02, groups)
                        for _ in range(copies)]
            times: dict[int, dict[str, float]] = {}
            for m in rows:
                if name == "lm_head" and m > HEAD_MAX_ROWS:
                    break
                x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
                if copies == 1:
                    times[m] = {kn: time_call(lambda f=f, x=x: f(x), args.min_time)
                                for kn, f in layer_ks[0].items()}
                else:
                    times[m] = {kn: time_cold([partial(ks[kn], x) for ks in layer_ks], flush,
                                              args.min_time)
                                for kn in layer_ks[0]}
                cells = "  ".join(f"{kn} {1e3 * t:8.3f}" for kn, t in times[m].items())
                print(f"{name:8} N={n:6} K={k:5} M={m:5}  {cells}  (ms)", flush=True)
            cross = {
                "int8": crossover(times, "int8", "dense"),
                "w8a8": crossover(times, "dense", "w8a8"),
                "w8a8_vs_int8": crossover(times, "int8", "w8a8"),
                **{f"int4-{g}": crossover(times, f"int4-{g}", "dense") for g in groups},
            }
            print(f"{name}: first M from which the second kernel wins at every larger M: "
                  "int8: int8 -> dense, w8a8: dense -> w8a8, w8a8_vs_int8: int8 -> w8a8, "
                  f"int4-G: int4 -> dense: {cross}")
            results[name] = {"shape": [n, k], "ms": {m: {kn: 1e3 * t for kn, t in tm.items()}
                                                   for m, tm in times.items()},
                             "crossover": cross}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": args.threads, "cold": args.cold, "shapes": results},
                              indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
