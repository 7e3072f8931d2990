"""Micro-benchmark of the radix prefix cache's per-request operations.

Replays a multi-turn chat trace (a shared system prompt, 8-turn conversations, prompts
of 200 to 4,000 tokens; fixed seed) against PrefixCache + SWAAllocator + ReqTable
with page 16 and window 512 and reports the median / p90 wall time in microseconds
of `match`, `admit` (lock), `cache_finished` (insert + unlock + free) and `evict`
per request, plus `match + cache_finished` for prompts of at least 3,500 tokens
(target: under 1 ms). Each request: match, admit, allocate the rest of the prompt and
its reply (evicting first if the pools are short), advance the frontier as decode
would, cache_finished. Prints a table and writes JSON (`--out`).

    python bench/cache_ops.py [--conversations 48] [--seed 0] [--out bench/results/cache_ops.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from swakv.cache import PrefixCache
from swakv.memory import Need, ReqTable, SWAAllocator
from swakv.memory.pages import page_ceil

PAGE, WINDOW = 16, 512
SYSTEM_LEN = 180
TURNS = 8
MAX_PROMPT = 4000


def make_trace(num_conv: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """(prompt, reply) per request, conversations interleaved turn by turn.

    Turn k's prompt = system prompt + all earlier (user, reply) pairs + a new user
    message, so each turn extends the previous one; prompts cap at MAX_PROMPT.
    """
    rng = random.Random(seed)
    system = [rng.randrange(32000) for _ in range(SYSTEM_LEN)]
    convs = []
    for _ in range(num_conv):
        history, turns = list(system), []
        for _ in range(TURNS):
            user = [rng.randrange(32000) for _ in range(rng.randrange(40, 560))]
            prompt = (history + user)[:MAX_PROMPT]
            reply = [rng.randrange(32000) for _ in range(rng.randrange(80, 400))]
            turns.append((prompt, reply))
            history = prompt + reply
        convs.append(turns)
    trace = []
    for k in range(TURNS):
        order = list(range(num_conv))
        rng.shuffle(order)
        trace.extend(convs[c][k] for c in order)
    return trace


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def run(num_conv: int, seed: int, full_tokens: int, swa_tokens: int) -> dict:
    alloc = SWAAllocator(full_tokens // PAGE, swa_tokens // PAGE, PAGE)
    table = ReqTable(4, MAX_PROMPT + 512)
    cache = PrefixCache(alloc, table, PAGE, WINDOW)
    trace = make_trace(num_conv, seed)
    times: dict[str, list[float]] = {"match": [], "admit": [], "insert": [], "evict": []}
    big: list[float] = []
    hit_tokens = window_miss_tokens = prompt_tokens = 0
    clock = time.perf_counter
    for prompt, reply in trace:
        t0 = clock()
        m = cache.match(prompt)
        t1 = clock()
        total = len(prompt) + len(reply)
        while True:
            want = page_ceil(total - m.prefix_len, PAGE)
            short = (Need(want, want) - alloc.available()).clamp_min(0)
            if short.is_zero():
                break
            t2 = clock()
            cache.evict(short)
            times["evict"].append(clock() - t2)
            m = cache.match(prompt)  # eviction may have taken part of the hit (not timed)
        t3 = clock()
        req = cache.admit(list(prompt), m)
        times["admit"].append(clock() - t3)
        times["match"].append(t1 - t0)
        req.token_ids += reply
        cache.extend(req, total - req.kv_len)  # prefill + decode, page aligned start
        cache.mark_computed(req, total)
        cache.advance_frontier(req, total)
        t4 = clock()
        cache.cache_finished(req)
        t5 = clock()
        times["insert"].append(t5 - t4)
        hit_tokens += m.prefix_len
        window_miss_tokens += m.full_only_len - m.prefix_len
        prompt_tokens += len(prompt)
        if len(prompt) >= 3500:
            big.append(times["match"][-1] + (t5 - t4))
    cache.check_integrity([])
    us = {k: [x * 1e6 for x in v] for k, v in times.items()}
    big_us = [x * 1e6 for x in big]
    rows = {k: {"n": len(v), "median_us": statistics.median(v) if v else float("nan"),
                "p90_us": percentile(v, 0.9)} for k, v in us.items()}
    rows["match+insert (>=3500 tok)"] = {
        "n": len(big_us), "median_us": statistics.median(big_us) if big_us else float("nan"),
        "p90_us": percentile(big_us, 0.9)}
    s = cache.stats()
    return {
        "config": {"page": PAGE, "window": WINDOW, "conversations": num_conv, "turns": TURNS,
                   "seed": seed, "full_pool_tokens": full_tokens, "swa_pool_tokens": swa_tokens,
                   "requests": len(trace), "torch_threads": torch.get_num_threads()},
        "ops": rows,
        "cache": {"nodes": s.num_nodes, "cached_full": s.cached.full, "cached_swa": s.cached.swa,
                  "hit_tokens": hit_tokens, "prompt_tokens": prompt_tokens,
                  "window_miss_tokens": window_miss_tokens, "dedup_tokens": s.dedup_tokens,
                  "revived_tokens": s.revived_tokens},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--conversations", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--full-tokens", type=int, default=131072)
    ap.add_argument("--swa-tokens", type=int, default=65536)
    ap.add_argument("--out", default="bench/results/cache_ops.json")
    args = ap.parse_args()
    res = run(args.conversations, args.seed, args.full_tokens, args.swa_tokens)
    print(f"{'op':<28}{'n':>6}{'median µs':>12}{'p90 µs':>10}")
    for name, r in res["ops"].items():
        print(f"{name:<28}{r['n']:>6}{r['median_us']:>12.1f}{r['p90_us']:>10.1f}")
    c = res["cache"]
    print(f"hit rate {c['hit_tokens'] / c['prompt_tokens']:.1%}, nodes {c['nodes']}, "
          f"window-miss tokens {c['window_miss_tokens']}, revived {c['revived_tokens']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
