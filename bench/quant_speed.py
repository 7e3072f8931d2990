"""Single-stream engine speed per quantization mode, modes interleaved.

One engine per mode (bf16, --threads threads) in one process; every round runs each
workload once on every engine in turn, so that load from other jobs on the shared
cores hits all modes alike; the median over rounds is reported:

    decode   32-token prompt + 128 new tokens: 128 / wall time (prefill included)
    prefill  2,000-token prompt to its first token (chunks of 512): 2000 / wall time
    step1    one decode step of a single request at context ~544 (ms)

plus the time to build the model (packed weights read from the disk cache) and the
bytes its linears hold.

    flock /tmp/swakv-cpu.lock .venv/bin/python bench/quant_speed.py --rounds 5
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
from swakv.engine.core import EngineCore
from swakv.sampling_params import SamplingParams


def _prompt(vocab: int, length: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab, (length,), generator=g).tolist()


def run_request(engine: EngineCore, length: int, new: int, seed: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    t0 = time.perf_counter()
    engine.add_request(_prompt(engine.spec.vocab_size, length, seed), params)
    while engine.has_unfinished():
        engine.step()
    return time.perf_counter() - t0


def decode_step_ms(engine: EngineCore, seed: int, steps: int = 8) -> float:
    """Median ms of a decode step of one request after a 512-token prompt (+ 32 tokens)."""
    params = SamplingParams(temperature=0, max_tokens=32 + steps + 1, ignore_eos=True)
    engine.add_request(_prompt(engine.spec.vocab_size, 512, seed), params)
    for _ in range(33):  # prefill (one chunk) and 32 decode steps
        engine.step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    while engine.has_unfinished():
        engine.step()
    return 1e3 * statistics.median(times)


def linear_bytes(engine: EngineCore) -> int:
    from profile_step import weight_bytes  # same directory

    return weight_bytes(engine)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", default="none,int8,int4,w8a8")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default="bench/results/quant_speed.json")
    args = ap.parse_args()
    modes = args.modes.split(",")
    engines: dict[str, EngineCore] = {}
    build_s: dict[str, float] = {}
    for mode in modes:
        cfg = EngineConfig(dtype="bfloat16", num_threads=args.threads,
                           kv_memory=float(256 << 20), max_running_requests=4,
                           quantization=mode)
        t0 = time.perf_counter()
        engines[mode] = build_engine(args.model, cfg)
        build_s[mode] = time.perf_counter() - t0
        run_request(engines[mode], 32, 8, 0)  # warm-up
    samples: dict[str, dict[str, list[float]]] = {
        m: {"decode_tok_s": [], "prefill_tok_s": [], "step1_ms": []} for m in modes}
    for r in range(args.rounds):
        for mode, engine in engines.items():
            samples[mode]["decode_tok_s"].append(128 / run_request(engine, 32, 128, 100 + r))
            samples[mode]["prefill_tok_s"].append(2000 / run_request(engine, 2000, 1, 200 + r))
            samples[mode]["step1_ms"].append(decode_step_ms(engine, 300 + r))
    results = {
        mode: {**{k: statistics.median(v) for k, v in samples[mode].items()},
               "build_s": build_s[mode], "linear_bytes": linear_bytes(engines[mode]),
               "samples": samples[mode]}
        for mode in modes
    }
    print(f"\nbf16, {args.threads} threads, median of {args.rounds} interleaved rounds")
    print(f"{'mode':<6} {'decode tok/s':>13} {'prefill tok/s':>14} {'step1 ms':>9} "
          f"{'build s':>8} {'linears MiB':>12}")
    for mode, r in results.items():
        print(f"{mode:<6} {r['decode_tok_s']:>13.1f} {r['prefill_tok_s']:>14.1f} "
              f"{r['step1_ms']:>9.2f} {r['build_s']:>8.2f} {r['linear_bytes'] / 2**20:>12.0f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": args.threads, "rounds": args.rounds,
                               "modes": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
