"""`swakv bench serve`: flags, and the command that runs, prints, writes and plots."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from swakv.bench.workload import ChatWorkload, DocsWorkload, TokenRange, WorkloadError


def _span(text: str) -> tuple[int, int]:
    """'3000:6000' -> (3000, 6000); '500' -> (500, 500)."""
    lo, _, hi = text.partition(":")
    try:
        return int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or MIN:MAX, got {text!r}") from None


def add_bench_serve(sub) -> None:
    p = sub.add_parser(
        "serve", help="load-test an OpenAI-compatible server (swakv or another engine)",
        description="Run the shared-prefix multi-turn chat and long-document workloads "
                    "against an OpenAI-compatible server (streamed /v1/completions with "
                    "token-id prompts, ignore_eos, greedy), print output tok/s, TTFT and "
                    "latency percentiles and prefix-hit tokens, and write JSON. With "
                    "--plot, draw throughput, TTFT and (swakv) KV pool usage over time.")
    p.add_argument("--base-url", default="http://127.0.0.1:8000",
                   help="server root (default: %(default)s; a trailing /v1 is fine)")
    p.add_argument("--model", default=None, help="model id (default: the first of /v1/models)")
    p.add_argument("--api-key", default=None,
                   help="bearer key (default: $SWAKV_API_KEY, else $OPENAI_API_KEY)")
    p.add_argument("--workload", choices=("chat", "docs", "both"), default="both")
    c, d = ChatWorkload(), DocsWorkload()
    g = p.add_argument_group("chat workload")
    g.add_argument("--sessions", type=int, default=c.sessions, help="S (default: %(default)s)")
    g.add_argument("--turns", type=int, default=c.turns, help="T (default: %(default)s)")
    g.add_argument("--system-len", type=int, default=c.system_len,
                   help="shared system prompt tokens (default: %(default)s)")
    g.add_argument("--user-len", type=int, default=c.user_len,
                   help="new user tokens per turn (default: %(default)s)")
    g.add_argument("--output-len", type=int, default=c.output_len,
                   help="output tokens per turn (default: %(default)s)")
    g = p.add_argument_group("docs workload")
    g.add_argument("--docs", type=int, default=d.num_docs, help="documents (default: %(default)s)")
    g.add_argument("--doc-len", type=_span, default=(d.min_len, d.max_len), metavar="MIN:MAX",
                   help=f"document tokens (default: {d.min_len}:{d.max_len})")
    g.add_argument("--doc-output-len", type=int, default=d.output_len,
                   help="output tokens per document (default: %(default)s)")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, help="prompt seed (default: %(default)s)")
    g.add_argument("--token-range", default="1000:30000", metavar="LO:HI",
                   help="prompt token ids are drawn from [LO, HI) (default: %(default)s)")
    g.add_argument("--max-concurrency", type=int, default=None,
                   help="most requests in flight (default: no limit)")
    g.add_argument("--scrape-interval", type=float, default=0.5,
                   help="seconds between /metrics samples (default: %(default)s)")
    g.add_argument("--out", default="bench-serve.json", help="JSON file (default: %(default)s)")
    g.add_argument("--plot", default=None, metavar="FILE.png",
                   help="draw throughput, TTFT and KV pool usage over time (needs matplotlib)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_bench_serve)


def cmd_bench_serve(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from swakv.bench.plot import PlotUnavailable, plot_run
    from swakv.bench.report import table, to_json
    from swakv.bench.runner import BenchConfig, BenchError, run_bench
    from swakv.cli import CliError

    try:
        chat = (ChatWorkload(ns.sessions, ns.turns, ns.system_len, ns.user_len, ns.output_len)
                if ns.workload in ("chat", "both") else None)
        docs = (DocsWorkload(ns.docs, ns.doc_len[0], ns.doc_len[1], ns.doc_output_len)
                if ns.workload in ("docs", "both") else None)
        tokens = TokenRange.parse(ns.token_range)
    except WorkloadError as e:
        parser.error(str(e))
    if ns.plot:  # fail before the run, not after it
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise CliError("--plot needs matplotlib: pip install 'swakv[plot]'") from None
    api_key = ns.api_key or os.environ.get("SWAKV_API_KEY") or os.environ.get("OPENAI_API_KEY")
    config = BenchConfig(ns.base_url, ns.model, api_key, chat, docs, tokens, ns.seed,
                         ns.max_concurrency, ns.scrape_interval,
                         progress=False if ns.no_progress else None)
    try:
        run = run_bench(config)
    except BenchError as e:
        raise CliError(str(e)) from None
    doc = to_json(run)
    print(table(doc))
    out = Path(ns.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    print(f"wrote {out}")
    if ns.plot:
        try:
            print(f"wrote {plot_run(doc, ns.plot)}")
        except PlotUnavailable as e:
            raise CliError(str(e)) from None
    failed = sum(w["failed"] for w in doc["workloads"].values())
    if failed:
        print(f"{failed} request(s) failed", file=sys.stderr)
    return 1 if failed else 0
