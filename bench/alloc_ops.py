"""Time the allocator work of one engine step: page 16, W = 512, 64 running requests.

Operations (each timed on its own, from the same starting state every repetition):
- decode:   alloc_decode for 64 requests (lengths chosen so some cross a page boundary)
- frontier: free_swa of the newly allowed range [frontier, max_frontier(L)) of each of
            the 64 requests, under one batch_free (every request advances one page:
            the worst case of a step in which all of them crossed a boundary)
- extend:   one alloc_extend of 1,024 tokens (fresh request, prefix 0)
- free:     one free of a finished 2,048-token request
- step:     decode + frontier + extend + free, back to back

The state is rebuilt (deep copy of a prepared allocator) before every repetition and
setup is not timed. Prints a table (median / p90 µs) and writes JSON.

    python bench/alloc_ops.py [--reps 2000] [--out bench/results/alloc_ops.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from swakv.memory.allocator import SWAAllocator
from swakv.memory.pages import max_frontier, num_pages

PAGE = 16
WINDOW = 512
NUM_REQS = 64
EXTEND_TOKENS = 1024
FINISHED_TOKENS = 2048
I64 = torch.int64


def build_state(seed: int = 0):
    """A pool sized for 64 requests of 2k-8k tokens, with those requests allocated.

    Returns (allocator, rows, lens, frontiers, finished_slots): rows[i] holds the full
    slots of request i's positions [0, lens[i]).
    """
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(2048, 8192, (NUM_REQS,), generator=g)
    # a quarter of the requests sit at a page boundary: their decode token takes a page
    lens[::4] = lens[::4] // PAGE * PAGE
    total_tokens = int(lens.sum()) + FINISHED_TOKENS + EXTEND_TOKENS
    full_pages = num_pages(total_tokens, PAGE) + 2 * NUM_REQS + 256
    # SWA pool: each request keeps ~W + 2 pages of live SWA, plus room for the extend
    swa_pages = NUM_REQS * (WINDOW // PAGE + 4) + 2 * num_pages(FINISHED_TOKENS, PAGE) + 256
    a = SWAAllocator(full_pages, swa_pages, PAGE)
    rows, frontiers = [], []
    for n in lens.tolist():
        slots = a.alloc_extend(0, n, None)
        # frontier one page behind the maximum: this step's advance frees one page
        f = max(0, max_frontier(n, WINDOW, PAGE) - PAGE)
        a.free_swa(slots[:f])
        rows.append(slots)
        frontiers.append(f)
    finished = a.alloc_extend(0, FINISHED_TOKENS, None)
    a.check_integrity()
    return a, rows, lens, frontiers, finished


def make_ops(state):
    _, rows, lens, frontiers, finished = state
    last_slots = torch.stack([r[-1] for r in rows])
    advance = [
        r[f : max_frontier(int(n), WINDOW, PAGE)] for r, n, f in zip(rows, lens, frontiers)
    ]

    def decode(a: SWAAllocator) -> None:
        a.alloc_decode(lens, last_slots)

    def frontier(a: SWAAllocator) -> None:
        with a.batch_free():
            for s in advance:
                a.free_swa(s)

    def extend(a: SWAAllocator) -> None:
        a.alloc_extend(0, EXTEND_TOKENS, None)

    def free(a: SWAAllocator) -> None:
        a.free(finished)

    def step(a: SWAAllocator) -> None:
        decode(a)
        frontier(a)
        extend(a)
        free(a)

    return {"decode": decode, "frontier": frontier, "extend": extend, "free": free, "step": step}


def time_op(base: SWAAllocator, fn, reps: int, warmup: int) -> list[float]:
    out = []
    for i in range(warmup + reps):
        a = copy.deepcopy(base)  # same starting state every repetition (not timed)
        t0 = time.perf_counter_ns()
        fn(a)
        dt = time.perf_counter_ns() - t0
        if i >= warmup:
            out.append(dt / 1e3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--out", default="bench/results/alloc_ops.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    state = build_state()
    base = state[0]
    ops = make_ops(state)
    # sanity: one step leaves a consistent allocator
    check = copy.deepcopy(base)
    ops["step"](check)
    check.check_integrity()

    crossing = int((state[2] % PAGE == 0).sum())
    results = {}
    for name, fn in ops.items():
        us = sorted(time_op(base, fn, args.reps, args.warmup))
        results[name] = {
            "median_us": statistics.median(us),
            "p90_us": us[int(0.9 * (len(us) - 1))],
            "min_us": us[0],
        }

    print(
        f"page={PAGE} W={WINDOW} requests={NUM_REQS} (decode crossing a page: {crossing}) "
        f"full_pages={base.full.pages.num_pages} swa_pages={base.swa.num_pages} "
        f"reps={args.reps} threads={args.threads}"
    )
    labels = {
        "decode": f"alloc_decode x{NUM_REQS}",
        "frontier": f"free_swa x{NUM_REQS} (batch_free)",
        "extend": f"alloc_extend {EXTEND_TOKENS}",
        "free": f"free {FINISHED_TOKENS}",
        "step": "one step (sum of the above)",
    }
    print(f"{'operation':<34}{'median µs':>11}{'p90 µs':>10}{'min µs':>10}")
    for name, r in results.items():
        print(f"{labels[name]:<34}{r['median_us']:>11.1f}{r['p90_us']:>10.1f}{r['min_us']:>10.1f}")
    parts = sum(results[k]["median_us"] for k in ("decode", "frontier", "extend", "free"))
    print(f"{'sum of part medians':<34}{parts:>11.1f}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "bench": "alloc_ops",
                "page_size": PAGE,
                "window": WINDOW,
                "num_requests": NUM_REQS,
                "decode_page_crossings": crossing,
                "extend_tokens": EXTEND_TOKENS,
                "finished_tokens": FINISHED_TOKENS,
                "full_pages": base.full.pages.num_pages,
                "swa_pages": base.swa.num_pages,
                "reps": args.reps,
                "threads": args.threads,
                "torch": torch.__version__,
                "python": platform.python_version(),
                "machine": platform.machine(),
                "results_us": results,
                "sum_of_part_medians_us": parts,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
