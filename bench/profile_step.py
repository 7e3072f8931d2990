"""Where one engine step spends its time on the real Gemma 3 270M.

First (`throughput`), single-stream speed through the engine: decode tok/s of a
32-token prompt + 128 new tokens (128 / wall time, prefill included) and prefill tok/s
of a 2,000-token prompt to its first token (chunks of 512), median of 3, plus the bytes
the model's linears hold. Then three steps, each driven through the engine
(`build_engine` + `add_request` + `step`):
- decode64: a decode step of 64 running requests (each with --context prompt tokens);
- decode1:  a decode step of one request (--context prompt tokens);
- prefill1024: one 1,024-token prefill chunk of a fresh prompt (chunk_size 1024; the
  step also samples the first token, one LM-head row).

For each step: the median wall time of --repeats steps and, for the median step, the
split into categories. The split comes from timers (and `record_function` ranges)
this script wraps around the engine's and the model's functions at run time (nothing
in swakv is changed for it); each category gets its own wall time minus that of the
labelled calls nested in it, except `lm_head`, which keeps its nested matmul and norm.
Torch CPU ops are synchronous, so wall time around a call is its cost. One further
step runs under torch.profiler to list the aten ops with the most self time (the
profiler's own overhead, a few microseconds per op, inflates those numbers; the
split does not use them).

    matmuls      weight matmuls of all layers (qkv, o, gate_up, down; with gate/up's GELU * up
                 when w8a8 fuses it into the rescale)
    lm_head      final norm + LM-head matmul + softcap (compute_logits), or for an
                 all-greedy batch the LM head with its argmax (greedy_tokens)
    attention    KV writes, gathers and SDPA (attend)
    norms_rope   RMSNorms (with the residual adds they fuse), q/k norms, RoPE tables and
                 rotation
    model_other  the rest of the forward: embedding, GELU * up, residual adds
    sampling     Sampler.sample
    metadata     attention metadata (positions, slots, gathers) per forward
    engine       Python around the model: scheduling, cache commits, runner glue,
                 output bookkeeping and detokenization

    flock /tmp/swakv-cpu.lock .venv/bin/python bench/profile_step.py --quantization int8

writes bench/results/profile_step_<quantization>.json (--out to change).
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.autograd.profiler import record_function

from swakv.config import EngineConfig
from swakv.engine.build import build_engine
from swakv.engine.core import EngineCore
from swakv.engine.runner import ModelRunner
from swakv.model import gemma3
from swakv.model.sampler import Sampler
from swakv.sampling_params import SamplingParams

CATEGORIES = ("matmuls", "lm_head", "attention", "norms_rope", "model_other", "sampling",
              "metadata", "engine")
ROOT = "engine"  # label of EngineCore.step: what nothing nested claims is engine time
ABSORBING = {"lm_head"}  # labels that keep the time of labels nested in them


class SplitTimer:
    """Exclusive wall time per label: a label's time minus that of labels nested in it.

    Torch CPU ops are synchronous, so perf_counter around a call covers its work.
    Labels in ABSORBING keep the time of everything nested in them.
    """

    def __init__(self) -> None:
        self.totals = dict.fromkeys(CATEGORIES, 0.0)
        self._stack: list[list[Any]] = []  # [label, start, time of nested labels]

    def reset(self) -> None:
        self.totals = dict.fromkeys(CATEGORIES, 0.0)

    def enter(self, label: str) -> None:
        self._stack.append([label, time.perf_counter(), 0.0])

    def exit(self) -> None:
        label, start, nested = self._stack.pop()
        elapsed = time.perf_counter() - start
        absorbed = any(frame[0] in ABSORBING for frame in self._stack)
        if not absorbed:
            self.totals[label] += elapsed if label in ABSORBING else elapsed - nested
        if self._stack:
            self._stack[-1][2] += elapsed


TIMER = SplitTimer()


def _wrap(owner: Any, attr: str, label: str) -> None:
    fn = getattr(owner, attr)

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        TIMER.enter(label)
        try:
            with record_function(f"swakv::{label}"):
                return fn(*args, **kwargs)
        finally:
            TIMER.exit()

    setattr(owner, attr, wrapped)


def instrument(engine: EngineCore) -> None:
    """Wrap the functions one step calls in a timer and `record_function("swakv::<label>")`."""
    _wrap(EngineCore, "step", ROOT)
    _wrap(ModelRunner, "build_metadata", "metadata")
    _wrap(gemma3.Gemma3Model, "forward", "model_other")
    _wrap(gemma3.Gemma3Model, "compute_logits", "lm_head")
    _wrap(gemma3.Gemma3Model, "greedy_tokens", "lm_head")  # greedy batches: no sampler call
    _wrap(gemma3, "attend", "attention")
    for name in ("rms_norm", "add_rms_norm", "rms_norm_rope", "apply_rope", "rope_cos_sin"):
        _wrap(gemma3, name, "norms_rope")
    _wrap(gemma3, "gate_up_gelu", "matmuls")  # gate/up and its GELU * up epilogue
    _wrap(Sampler, "sample", "sampling")
    model = engine.runner.model
    linear_types = {type(getattr(layer, n)) for layer in model.layers
                    for n in ("qkv", "o", "gate_up", "down")}
    for cls in linear_types:
        _wrap(cls, "__call__", "matmuls")


def top_ops(prof: Any, limit: int) -> list[tuple[str, float]]:
    """The aten ops with the most self CPU time (ms per profiled step summed)."""
    rows = [(e.key, e.self_cpu_time_total / 1e3) for e in prof.key_averages()
            if not e.key.startswith("swakv::")]
    return sorted(rows, key=lambda r: -r[1])[:limit]


# ------------------------------------------------------------------------ scenarios


def _prompt(vocab: int, length: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab, (length,), generator=g).tolist()


class Scenario:
    """Brings an engine to the state before the measured step; `step()` runs one."""

    name = ""

    def __init__(self, engine: EngineCore, context: int) -> None:
        self.engine, self.context = engine, context
        self.vocab = engine.spec.vocab_size
        self.seed = 0

    def _add(self, length: int, max_tokens: int) -> None:
        self.seed += 1
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        self.engine.add_request(_prompt(self.vocab, length, 1000 + self.seed), params)

    def prepare(self) -> None:
        """State for the next measured step (called before each one)."""

    def step(self) -> int:
        """Run one engine step; returns the number of tokens it scheduled."""
        before = self.engine.metrics.num_scheduled_tokens
        self.engine.step()
        return self.engine.metrics.num_scheduled_tokens - before


class Decode(Scenario):
    def __init__(self, engine: EngineCore, context: int, batch: int, steps: int) -> None:
        super().__init__(engine, context)
        self.name, self.batch = f"decode{batch}", batch
        # prefilling all prompts takes at most this many steps, each decoding <= 1 token
        # per request: no request may finish before the last prompt is in
        prefill_steps = -(-batch * context // engine.cost.chunk_size) + batch
        for _ in range(batch):
            self._add(context, max_tokens=prefill_steps + steps + 64)
        for _ in range(2 * prefill_steps):  # prefill all; then each step decodes the batch
            if self.step() == batch and all(
                r.num_computed_tokens >= r.num_prompt_tokens for r in engine.scheduler.running
            ):
                return
        raise RuntimeError(f"{batch} requests of {context} tokens never decoded together "
                           "(too little KV memory for the batch?)")


class Prefill(Scenario):
    def __init__(self, engine: EngineCore, context: int, chunk: int) -> None:
        super().__init__(engine, context)
        self.name, self.chunk = f"prefill{chunk}", chunk

    def prepare(self) -> None:
        while self.engine.has_unfinished():  # the previous request's 1 token
            self.engine.step()
        self._add(self.chunk, max_tokens=1)


def measure(scenario: Scenario, repeats: int, warmup: int) -> dict[str, Any]:
    for _ in range(warmup):
        scenario.prepare()
        scenario.step()
    walls, splits = [], []
    for _ in range(repeats):
        scenario.prepare()
        TIMER.reset()
        t0 = time.perf_counter()
        num_tokens = scenario.step()
        walls.append(time.perf_counter() - t0)
        splits.append(TIMER.totals)
    mid = sorted(range(repeats), key=walls.__getitem__)[repeats // 2]  # the median step
    median = walls[mid]
    ms = {k: 1e3 * v for k, v in splits[mid].items()}
    scenario.prepare()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        scenario.step()
    return {
        "tokens": num_tokens,
        "wall_ms_median": 1e3 * median,
        "wall_ms_all": [1e3 * w for w in walls],
        "split_ms": ms,
        "split_pct": {k: 100 * v / (1e3 * median) for k, v in ms.items()},
        "top_ops_ms_profiled": top_ops(prof, 10),
    }


def throughput(engine: EngineCore, repeats: int) -> dict[str, float]:
    """Single-stream tok/s through the engine (median of `repeats`):
    decode: 32-token prompt + 128 new tokens, 128 / wall time (prefill included);
    prefill: a 2,000-token prompt to its first token, 2000 / wall time."""
    vocab = engine.spec.vocab_size

    def run(length: int, new: int, seed: int) -> float:
        params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
        t0 = time.perf_counter()
        engine.add_request(_prompt(vocab, length, seed), params)
        while engine.has_unfinished():
            engine.step()
        return time.perf_counter() - t0

    run(32, 8, 0)  # warm-up
    decode = sorted(run(32, 128, 10 + i) for i in range(repeats))[repeats // 2]
    prefill = sorted(run(2000, 1, 20 + i) for i in range(repeats))[repeats // 2]
    return {"decode_tok_s": 128 / decode, "prefill_tok_s": 2000 / prefill}


def weight_bytes(engine: EngineCore) -> int:
    """Bytes of the tensors the model's linears hold (all kernels, dense copies included)."""
    seen: set[int] = set()  # storages (views such as a transposed weight count once)
    total = 0

    def visit(obj: Any) -> None:
        nonlocal total
        for value in vars(obj).values():
            if isinstance(value, torch.Tensor):
                # oneDNN-prepacked weights are opaque (no storage): count their elements
                key = id(value) if value.is_mkldnn else value.untyped_storage().data_ptr()
                if key in seen:
                    continue
                seen.add(key)
                total += (value.numel() * value.element_size() if value.is_mkldnn
                          else value.untyped_storage().nbytes())
            elif isinstance(value, dict):
                for v in value.values():
                    if hasattr(v, "__dict__"):
                        visit(v)
            elif hasattr(value, "__dict__") and not callable(value):
                visit(value)

    for lin in engine.runner.model.linears.values():
        visit(lin)
    return total


def build(args: argparse.Namespace, chunk: int) -> EngineCore:
    kw: dict[str, Any] = {}
    if args.quantization != "none":
        kw["quantization"] = args.quantization  # EngineConfig field added with quant.py
    cfg = EngineConfig(dtype=args.dtype, num_threads=args.threads, kv_memory=args.kv_memory,
                       chunk_size=chunk, max_running_requests=64, **kw)
    return build_engine(args.model, cfg)


def print_table(title: str, results: dict[str, dict[str, Any]]) -> None:
    names = list(results)
    print(f"\n{title}")
    print(f"{'category':<14}" + "".join(f"{n:>20}" for n in names))
    for cat in CATEGORIES:
        cells = "".join(
            f"{results[n]['split_ms'][cat]:>11.2f} ms {results[n]['split_pct'][cat]:>4.1f}%"
            for n in names
        )
        print(f"{cat:<14}{cells}")
    print(f"{'step (median)':<14}" + "".join(f"{results[n]['wall_ms_median']:>17.2f} ms"
                                             for n in names))
    for n in names:
        ops = ", ".join(f"{k} {v:.1f}" for k, v in results[n]["top_ops_ms_profiled"][:6])
        print(f"  top ops {n} (profiled ms): {ops}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model dir or .gguf (default: Gemma 3 270M)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--quantization", default="none", help="none | int8 | int4 | w8a8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context", type=int, default=512, help="prompt tokens of decode requests")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--kv-memory", type=float, default=float(3 << 30))
    ap.add_argument("--only", default="throughput,decode64,decode1,prefill1024")
    ap.add_argument("--throughput-repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="JSON path (default: "
                    "bench/results/profile_step_<quantization>.json)")
    args = ap.parse_args()
    wanted = args.only.split(",")
    makers: dict[str, Callable[[], Scenario]] = {
        "decode64": lambda: Decode(build(args, 512), args.context, 64, 64),
        "decode1": lambda: Decode(build(args, 512), args.context, 1, 64),
        "prefill1024": lambda: Prefill(build(args, 1024), args.context, 1024),
    }
    results: dict[str, dict[str, Any]] = {}
    extra: dict[str, Any] = {}
    if "throughput" in wanted:  # before instrumenting: no wrappers in the timed steps
        wanted.remove("throughput")
        engine = build(args, 512)
        extra["linear_weight_bytes"] = weight_bytes(engine)
        extra["throughput"] = throughput(engine, args.throughput_repeats)
        del engine
        t = extra["throughput"]
        print(f"single stream: decode {t['decode_tok_s']:.1f} tok/s, prefill "
              f"{t['prefill_tok_s']:.1f} tok/s; linear weights "
              f"{extra['linear_weight_bytes'] / 2**20:.0f} MiB")
    instrumented = False
    for name in wanted:
        scenario = makers[name]()
        if not instrumented:
            instrument(scenario.engine)
            instrumented = True
        results[name] = measure(scenario, args.repeats, args.warmup)
        del scenario
    title = (f"step profile: {args.dtype}, quantization {args.quantization}, "
             f"{torch.get_num_threads()} threads, context {args.context}")
    if results:
        print_table(title, results)
    out = Path(args.out or f"bench/results/profile_step_{args.quantization}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"dtype": args.dtype, "quantization": args.quantization,
            "threads": torch.get_num_threads(), "context": args.context,
            "repeats": args.repeats}
    out.write_text(json.dumps({"config": meta, **extra, "steps": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
