"""`swakv plan` and `swakv simulate`: subcommands registered into the main CLI.

`register(subparsers)` adds both parsers; each sets `run` (a function of the parsed
namespace returning an exit code), so `swakv.cli.main` dispatches with `ns.run(ns)`.
"""

from __future__ import annotations

import argparse
import json
import sys

from swakv.plan.models import UnknownModel, load_plan_model, shipped_model_names
from swakv.plan.policies import SwakvKnobs
from swakv.plan.report import (
    DTYPES,
    OtherKnobs,
    PlanError,
    make_plan,
    parse_bytes,
    parse_contexts,
    plan_json,
    plan_table,
)

MODEL_HELP = ("a shipped model config ({}) or a Hugging Face config.json (or its directory)")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `plan` and `simulate` to the `swakv` command's subparsers."""
    from swakv.sim.cli import add_simulate_parser

    p = subparsers.add_parser(
        "plan", help="KV pool sizes and concurrent requests per context, swakv vs other engines",
        description="Pool sizes and how many concurrent requests of each context length a "
                    "KV budget holds under swakv's cost model and under the sizing rules of "
                    "SGLang, vLLM and llama.cpp (and with no SWA savings at all).")
    add_model_args(p)
    p.add_argument("--context", default="8k,32k,128k",
                   help="context lengths (prompt + output tokens), k = 1024 (default: %(default)s)")
    p.add_argument("--chunk-size", type=int, default=SwakvKnobs.chunk_size,
                   help="swakv prefill chunk (default: %(default)s)")
    p.add_argument("--decode-reserve", type=int, default=SwakvKnobs.decode_reserve,
                   help="swakv decode reserve (default: %(default)s)")
    p.add_argument("--frontier-stride", type=int, default=SwakvKnobs.frontier_stride,
                   help="swakv SWA frontier stride (default: %(default)s)")
    p.add_argument("--sglang-swa-ratio", type=float, default=0.8,
                   help="SGLang swa_full_tokens_ratio (default: %(default)s)")
    p.add_argument("--vllm-block-size", type=int, default=16,
                   help="vLLM block size (default: %(default)s)")
    p.add_argument("--vllm-max-batched-tokens", type=int, default=8192,
                   help="vLLM max_num_batched_tokens (default: %(default)s, its default on "
                        "GPUs with >= 70 GiB)")
    p.add_argument("--llamacpp-ubatch", type=int, default=512,
                   help="llama.cpp n_ubatch (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.set_defaults(run=run_plan)
    add_simulate_parser(subparsers)


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help=MODEL_HELP.format(", ".join(shipped_model_names())))
    p.add_argument("--kv-memory", required=True, metavar="SIZE",
                   help="KV budget per accelerator, like 60GiB (K/M/G/T decimal unless "
                        "followed by i)")
    p.add_argument("--page-size", type=int, default=16, help="tokens per page (default: %(default)s)")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES),
                   help="KV cache dtype (default: %(default)s)")


def run_plan(ns: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> int:
    try:
        model = load_plan_model(ns.model)
        knobs = SwakvKnobs(ns.page_size, ns.chunk_size, ns.decode_reserve, ns.frontier_stride)
        others = OtherKnobs(ns.sglang_swa_ratio, ns.vllm_block_size, ns.vllm_max_batched_tokens,
                            ns.llamacpp_ubatch)
        plan = make_plan(model, parse_bytes(ns.kv_memory), parse_contexts(ns.context), ns.dtype,
                         knobs, others, budget_label=ns.kv_memory)
    except (UnknownModel, PlanError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(plan_json(plan), indent=2) if ns.json else plan_table(plan))
    return 0
