"""In-process serving workloads on the real Gemma 3 270M (ignore_eos, fixed lengths).

(a) chat: 64 sessions share one 1,000-token system prompt, 4 turns each; every turn
    adds a 100-token user message and produces exactly 64 tokens; each turn's
    prompt is the whole conversation so far. Sessions run concurrently.
(b) docs: 16 prompts of 3,000-6,000 tokens, 128 output tokens each.

Prints a table and writes JSON. Peak KV bytes count pages pinned by live requests
(not free, not evictable cache); the ideal at each step is the sum over live
requests of full-layer bytes for all their tokens plus SWA-layer bytes for at most
one window.

    .venv/bin/python bench/serve_workload.py --workload both --out bench/results/serve.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from swakv.config import EngineConfig, KVLayout
from swakv.engine.build import build_engine
from swakv.engine.core import EngineCore
from swakv.sampling_params import SamplingParams
from swakv.sched.request import Request


@dataclass
class Tracker:
    """Peak pinned and ideal KV bytes over the run."""

    full_bpt: int
    swa_bpt: int
    window: int
    peak_full: int = 0
    peak_swa: int = 0
    peak_total: int = 0
    peak_ideal: int = 0
    peak_used_incl_cache: int = 0
    samples: int = 0

    def sample(self, eng: EngineCore) -> None:
        avail, total = eng.allocator.available(), eng.allocator.total()
        evictable = eng.cache.evictable()
        pinned_full = (total.full - avail.full - evictable.full) * self.full_bpt
        pinned_swa = (total.swa - avail.swa - evictable.swa) * self.swa_bpt
        used = (total.full - avail.full) * self.full_bpt + (total.swa - avail.swa) * self.swa_bpt
        ideal = sum(
            r.kv.alloc_len * self.full_bpt + min(r.kv.alloc_len, self.window) * self.swa_bpt
            for r in eng.scheduler.running if r.kv is not None
        )
        self.peak_full = max(self.peak_full, pinned_full)
        self.peak_swa = max(self.peak_swa, pinned_swa)
        self.peak_total = max(self.peak_total, pinned_full + pinned_swa)
        self.peak_ideal = max(self.peak_ideal, ideal)
        self.peak_used_incl_cache = max(self.peak_used_incl_cache, used)
        self.samples += 1


@dataclass
class Result:
    workload: str
    num_requests: int
    wall_s: float
    output_tokens: int
    output_tok_s: float
    latency_p50_s: float
    latency_p90_s: float
    ttft_p50_s: float
    ttft_p90_s: float
    prompt_tokens: int
    prefix_hit_tokens: int
    prefix_hit_ratio: float
    retractions: int
    peak_kv_full_bytes: int
    peak_kv_swa_bytes: int
    peak_kv_bytes: int
    ideal_kv_bytes: int
    peak_over_ideal: float
    peak_used_incl_cache_bytes: int
    extra: dict = field(default_factory=dict)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else 0.0


def tokens(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(10, vocab - 10) for _ in range(n)]


def drive(eng: EngineCore, tracker: Tracker, on_finish) -> None:
    while eng.has_unfinished():
        outs = eng.step()
        tracker.sample(eng)
        for o in outs:
            if o.finished:
                on_finish(o.request)


def run_chat(eng: EngineCore, tracker: Tracker, seed: int, sessions: int, turns: int,
             output_len: int = 64, system_len: int = 1000, user_len: int = 100) -> list[Request]:
    rng = random.Random(seed)
    vocab = eng.spec.vocab_size
    system = [eng.spec.bos_token_id or 2] + tokens(rng, system_len - 1, vocab)
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    convo = {s: list(system) + tokens(rng, user_len, vocab) for s in range(sessions)}
    turn = dict.fromkeys(range(sessions), 1)
    done: list[Request] = []
    owner: dict[str, int] = {}
    for s in range(sessions):
        owner[eng.add_request(convo[s], params).request_id] = s

    def on_finish(req: Request) -> None:
        done.append(req)
        s = owner[req.request_id]
        if turn[s] < turns:
            turn[s] += 1
            convo[s] = req.token_ids + tokens(rng, user_len, vocab)
            owner[eng.add_request(convo[s], params).request_id] = s

    drive(eng, tracker, on_finish)
    return done


def run_docs(eng: EngineCore, tracker: Tracker, seed: int, num_docs: int) -> list[Request]:
    rng = random.Random(seed)
    params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
    reqs = [eng.add_request(tokens(rng, rng.randint(3000, 6000), eng.spec.vocab_size), params)
            for _ in range(num_docs)]
    drive(eng, tracker, lambda r: None)
    return reqs


def summarise(name: str, eng: EngineCore, reqs: list[Request], wall: float, tracker: Tracker) -> Result:
    c = eng.scheduler.counters
    out_tokens = sum(r.num_output_tokens for r in reqs)
    prompt_tokens = sum(r.num_prompt_tokens for r in reqs)
    hits = sum(r.cached_prompt_tokens for r in reqs)
    return Result(
        workload=name,
        num_requests=len(reqs),
        wall_s=wall,
        output_tokens=out_tokens,
        output_tok_s=out_tokens / wall,
        latency_p50_s=pct([r.finish_time - r.arrival_time for r in reqs], 0.5),
        latency_p90_s=pct([r.finish_time - r.arrival_time for r in reqs], 0.9),
        ttft_p50_s=pct([r.first_token_time - r.arrival_time for r in reqs], 0.5),
        ttft_p90_s=pct([r.first_token_time - r.arrival_time for r in reqs], 0.9),
        prompt_tokens=prompt_tokens,
        prefix_hit_tokens=hits,
        prefix_hit_ratio=hits / max(1, prompt_tokens),
        retractions=c.num_retractions,
        peak_kv_full_bytes=tracker.peak_full,
        peak_kv_swa_bytes=tracker.peak_swa,
        peak_kv_bytes=tracker.peak_total,
        ideal_kv_bytes=tracker.peak_ideal,
        peak_over_ideal=tracker.peak_total / max(1, tracker.peak_ideal),
        peak_used_incl_cache_bytes=tracker.peak_used_incl_cache,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", choices=["chat", "docs", "both"], default="both")
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--quantization", default="none")
    ap.add_argument("--kv-memory", type=float, default=4 << 30)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--chunk-size", type=int, default=EngineConfig.chunk_size)
    ap.add_argument("--max-running", type=int, default=64)
    ap.add_argument("--sessions", type=int, default=64)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--docs", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results/serve_workload.json")
    args = ap.parse_args()
    cfg = EngineConfig(page_size=args.page_size, kv_memory=args.kv_memory, dtype=args.dtype,
                       quantization=args.quantization,
                       chunk_size=args.chunk_size, max_running_requests=args.max_running)
    names = ["chat", "docs"] if args.workload == "both" else [args.workload]
    results = []
    for name in names:
        eng = build_engine(args.model, cfg)
        layout = KVLayout.from_model(eng.spec, cfg.torch_dtype)
        tracker = Tracker(layout.bytes_per_token(False), layout.bytes_per_token(True),
                          eng.spec.window or 0)
        t0 = time.perf_counter()
        if name == "chat":
            reqs = run_chat(eng, tracker, args.seed, args.sessions, args.turns)
        else:
            reqs = run_docs(eng, tracker, args.seed, args.docs)
        res = summarise(name, eng, reqs, time.perf_counter() - t0, tracker)
        res.extra = {"steps": eng.metrics.num_steps,
                     "step_ms_p50": 1000 * statistics.median(eng.metrics.step_times)}
        results.append(res)
    rows = [asdict(r) for r in results]
    keys = [k for k in rows[0] if k != "extra"]
    print(f"{'metric':<28}" + "".join(f"{r['workload']:>16}" for r in rows))
    for k in keys[1:]:
        vals = [r[k] for r in rows]
        print(f"{k:<28}" + "".join(f"{v:>16.3f}" if isinstance(v, float) else f"{v:>16}" for v in vals))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"config": vars(args), "results": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
