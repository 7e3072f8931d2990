"""`swakv simulate`: a trace through the real scheduler and cache with a simulated clock."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from swakv.config import EngineConfig
from swakv.sim.trace import DEFAULT_DOC_RATE, DEFAULT_SESSION_RATE

DEFAULT_NUM_REQUESTS = 1000  # of the built-in chat and docs traces


def add_simulate_parser(subparsers: argparse._SubParsersAction) -> None:
    from swakv.plan.cli import add_model_args

    p = subparsers.add_parser(
        "simulate", help="run a request trace through swakv's scheduler and cache, no model",
        description="Drive the real scheduler, radix cache and allocators (no KV tensors, no "
                    "model) with a simulated clock: step time = a + b*tokens + c*attention "
                    "key reads. Reports throughput, TTFT and latency percentiles, prefix "
                    "hits, peak pool usage, retractions and queueing.")
    add_model_args(p)
    p.add_argument("--trace", default="chat",
                   help="'chat', 'docs' or a JSONL trace file (default: %(default)s)")
    p.add_argument("--requests", type=int, default=None,
                   help=f"requests to simulate (chat/docs: default {DEFAULT_NUM_REQUESTS}; "
                        "a file: all)")
    p.add_argument("--seed", type=int, default=0, help="trace seed (default: %(default)s)")
    p.add_argument("--rate", type=float, default=None,
                   help=f"sessions (chat, default {DEFAULT_SESSION_RATE}) or documents (docs, "
                        f"default {DEFAULT_DOC_RATE}) per second")
    p.add_argument("--chunk-size", type=int, default=2048,
                   help="prefill chunk (default: %(default)s)")
    p.add_argument("--max-running-requests", type=int, default=128,
                   help="most running requests (default: %(default)s)")
    p.add_argument("--decode-reserve", type=int, default=256, help="default: %(default)s")
    p.add_argument("--frontier-stride", type=int, default=64, help="default: %(default)s")
    p.add_argument("--swa-fraction", type=float, default=None,
                   help="share of the budget for the SWA pool (default: sized by the cost model)")
    p.add_argument("--no-prefix-cache", action="store_true", help="disable the radix cache")
    p.add_argument("--host-kv-memory", default=None,
                   help="simulated host tier, like 240GiB or 4x (default: off)")
    p.add_argument("--step-time", default=None, metavar="A,B,C",
                   help="step time coefficients: seconds, seconds per token, seconds per "
                        "key read (default: a roofline estimate for an H100)")
    p.add_argument("--profile", default=None, metavar="FILE",
                   help="fit the step time to steps timed on the real engine (JSONL from "
                        "`python -m swakv.sim.profile`)")
    p.add_argument("--integrity-every", type=int, default=5000,
                   help="steps between check_integrity() samples (default: %(default)s)")
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="draw pool usage, throughput and queues over time")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.set_defaults(run=run_simulate)


def run_simulate(ns: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> int:
    from swakv.plan.models import UnknownModel, load_plan_model
    from swakv.plan.report import DTYPES, PlanError, parse_bytes
    from swakv.sim.report import report_json, report_table
    from swakv.sim.simulator import Simulator
    from swakv.sim.steptime import StepTimeError, StepTimeModel, fit_step_time, read_profile
    from swakv.sim.trace import TraceError, chat_trace, docs_trace, read_jsonl

    try:
        model = load_plan_model(ns.model)
        budget = parse_bytes(ns.kv_memory)
        cfg = EngineConfig(
            page_size=ns.page_size, kv_memory=budget, swa_fraction=ns.swa_fraction,
            max_running_requests=ns.max_running_requests, chunk_size=ns.chunk_size,
            decode_reserve=ns.decode_reserve, frontier_stride=ns.frontier_stride,
            enable_prefix_cache=not ns.no_prefix_cache, host_kv_memory=ns.host_kv_memory,
            dtype="bfloat16" if ns.dtype != "fp32" else "float32")
        kv_dtype = DTYPES[ns.dtype]
        if ns.step_time and ns.profile:
            raise StepTimeError("give --step-time or --profile, not both")
        if ns.profile:
            step_time = fit_step_time(read_profile(ns.profile))
        elif ns.step_time:
            step_time = StepTimeModel.parse(ns.step_time)
        else:
            step_time = StepTimeModel.roofline(model.spec, kv_dtype.itemsize)
        trace = _trace(ns, model.spec.vocab_size, chat_trace, docs_trace, read_jsonl)
        sim = Simulator(model.spec, cfg, step_time, integrity_every=ns.integrity_every,
                        name=model.name, kv_dtype=kv_dtype)
    except (UnknownModel, PlanError, StepTimeError, TraceError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = sim.run(trace)
    print(json.dumps(report_json(report), indent=2) if ns.json else report_table(report))
    if ns.plot:
        from swakv.sim.plot import plot_timeline

        plot_timeline(sim.timeline, report, Path(ns.plot))
        if not ns.json:
            print(f"plot: {ns.plot}")
    return 0


def _trace(ns: argparse.Namespace, vocab: int, chat_trace, docs_trace, read_jsonl):
    if ns.requests is not None and ns.requests < 1:
        raise ValueError("--requests must be >= 1")
    num_requests = ns.requests or DEFAULT_NUM_REQUESTS
    if ns.trace == "chat":
        rate = DEFAULT_SESSION_RATE if ns.rate is None else ns.rate
        return chat_trace(num_requests, ns.seed, session_rate=rate)
    if ns.trace == "docs":
        return docs_trace(num_requests, ns.seed, doc_rate=DEFAULT_DOC_RATE if ns.rate is None
                          else ns.rate)
    return read_jsonl(ns.trace, limit=ns.requests)
