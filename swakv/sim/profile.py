"""Time the real engine's steps, to fit the simulator's step time model.

    python -m swakv.sim.profile --out steps.jsonl [--model M] [--requests 96]
    swakv simulate --profile steps.jsonl ...

Runs requests of mixed prompt lengths (chunked prefills, decodes at many depths)
through the real engine with its executor wrapped in a `ProfilingExecutor`, writes one
`StepSample` per step and prints the fitted coefficients.
"""

from __future__ import annotations

import argparse
import random

from swakv.engine.core import EngineCore
from swakv.sampling_params import SamplingParams
from swakv.sim.executor import ProfilingExecutor
from swakv.sim.steptime import StepSample, fit_step_time, write_profile


def profile_engine(core: EngineCore, num_requests: int = 48, seed: int = 0,
                   prompt_len: tuple[int, int] = (16, 2048), output_len: tuple[int, int] = (8, 64),
                   max_concurrent: int = 16) -> list[StepSample]:
    """Time every step of `num_requests` random requests (at most `max_concurrent` queued
    at once, so batches of many sizes occur). Wraps `core.executor` for the run."""
    rng = random.Random(seed)
    timed = ProfilingExecutor(core.executor, core.spec)
    inner, core.executor = core.executor, timed
    try:
        left = num_requests
        while left or core.has_unfinished():
            while left and len(core.scheduler.running) + len(core.scheduler.waiting) < max_concurrent:
                n = rng.randint(*prompt_len)
                prompt = [rng.randrange(3, core.spec.vocab_size) for _ in range(n)]
                out = rng.randint(*output_len)
                core.add_request(prompt, SamplingParams(temperature=0, max_tokens=out,
                                                        ignore_eos=True))
                left -= 1
            for o in core.step():
                if o.finished:
                    core.release(o.request.request_id)
    finally:
        core.executor = inner
    return timed.samples


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSONL file of timed steps")
    ap.add_argument("--model", default=None, help="model (default: Gemma 3 270M)")
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--concurrency", type=int, default=64,
                    help="most requests queued or running at once (default: %(default)s)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--kv-memory", type=float, default=2 << 30)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from swakv.config import EngineConfig
    from swakv.engine.build import build_engine

    core = build_engine(args.model, EngineConfig(kv_memory=args.kv_memory, dtype=args.dtype))
    samples = profile_engine(core, args.requests, args.seed, max_concurrent=args.concurrency)
    write_profile(args.out, samples)
    m = fit_step_time(samples)
    print(f"{len(samples)} steps -> a={m.a:.6g} s, b={m.b:.6g} s/token, c={m.c:.6g} s/key read "
          f"({m.source}); wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
