"""Summaries, the printed table, the JSON document and the timelines of a BenchRun.

Per workload: output tok/s = output tokens of its requests / its wall time (first
send to last answer); TTFT and latency percentiles over its successful requests
(nearest rank: p-th percentile = sorted[ceil(p/100 * n) - 1]); prefix-hit tokens
= the sum of `usage.prompt_tokens_details.cached_tokens` (None when the server does
not report it).

Timelines (seconds since the start of the run): output tok/s in bins of `bin_s`,
one (start, TTFT) point per request, and swakv's KV pool usage samples.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

from swakv.bench.client import RequestRecord
from swakv.bench.runner import BenchRun

PERCENTILES = (50, 90, 99)


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile: percentile([1, 2, 3, 4], 50) == 2; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def summarize(records: list[RequestRecord], wall: tuple[float, float]) -> dict[str, Any]:
    ok = [r for r in records if r.error is None]
    seconds = max(wall[1] - wall[0], 1e-9)
    output = sum(r.output_tokens for r in ok)
    cached = [r.cached_tokens for r in ok if r.cached_tokens is not None]
    prompt = sum(r.prompt_tokens for r in ok)
    out: dict[str, Any] = {
        "requests": len(records), "failed": len(records) - len(ok), "wall_s": seconds,
        "prompt_tokens": prompt, "output_tokens": output, "output_tok_s": output / seconds,
        "prefix_hit_tokens": sum(cached) if cached else None,
        "prefix_hit_ratio": (sum(cached) / prompt if cached and prompt else None),
    }
    for name, values in (("ttft_s", [r.ttft for r in ok if r.ttft is not None]),
                         ("latency_s", [r.latency for r in ok if r.latency is not None])):
        for p in PERCENTILES:
            out[f"{name}_p{p}"] = percentile(values, p)
    if len(ok) < len(records):
        out["first_error"] = next(r.error for r in records if r.error is not None)
    return out


def throughput_timeline(records: list[RequestRecord], end: float, bin_s: float
                        ) -> list[tuple[float, float]]:
    """[(bin start, output tok/s in [start, start + bin_s))] from 0 to `end`."""
    num_bins = max(1, math.ceil(end / bin_s))
    counts = [0] * num_bins
    for r in records:
        for t, n in r.token_times:
            counts[min(num_bins - 1, int(t / bin_s))] += n
    return [(i * bin_s, c / bin_s) for i, c in enumerate(counts)]


def to_json(run: BenchRun, bin_s: float | None = None) -> dict[str, Any]:
    """The whole run as a JSON-ready dict (the `--out` file)."""
    every = [r for rs in run.records.values() for r in rs]
    end = max([w[1] for w in run.walls.values()] + [0.0])
    bin_s = bin_s or max(end / 60, 1e-3)  # about 60 bins whatever the run's length
    cfg = run.config
    return {
        "server": {"base_url": cfg.root, "model": run.model, "is_swakv": run.is_swakv,
                   "token_ids_returned": any(r.token_ids_returned for r in every)},
        "config": {"chat": asdict(cfg.chat) if cfg.chat else None,
                   "docs": asdict(cfg.docs) if cfg.docs else None,
                   "token_range": [cfg.tokens.lo, cfg.tokens.hi], "seed": cfg.seed,
                   "max_concurrency": cfg.max_concurrency},
        "workloads": {name: summarize(rs, run.walls[name]) for name, rs in run.records.items()},
        "timeline": {
            "bin_s": bin_s,
            "output_tok_s": throughput_timeline(every, end, bin_s),
            "ttft": [(r.start, r.ttft, r.workload) for r in every if r.ttft is not None],
            "kv_pools": [asdict(s) for s in run.pool_samples],
            "workload_spans": {name: list(w) for name, w in run.walls.items()},
        },
        "requests": [{"workload": r.workload, "session": r.session, "turn": r.turn,
                      "start_s": r.start, "ttft_s": r.ttft, "latency_s": r.latency,
                      "prompt_tokens": r.prompt_tokens, "output_tokens": r.output_tokens,
                      "cached_tokens": r.cached_tokens, "error": r.error} for r in every],
    }


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value * 1000:,.0f} ms" if unit == "ms" else f"{value:,.2f}"
    return f"{value:,}"


def table(doc: dict[str, Any]) -> str:
    """The printed summary: one column per workload."""
    names = list(doc["workloads"])
    rows = [("requests (failed)", lambda w: f"{w['requests']} ({w['failed']})"),
            ("wall time s", lambda w: _fmt(w["wall_s"])),
            ("output tok/s", lambda w: _fmt(w["output_tok_s"])),
            ("output tokens", lambda w: _fmt(w["output_tokens"])),
            ("prompt tokens", lambda w: _fmt(w["prompt_tokens"])),
            ("prefix-hit tokens", lambda w: _fmt(w["prefix_hit_tokens"]))]
    for p in PERCENTILES:
        rows.append((f"TTFT p{p}", lambda w, p=p: _fmt(w[f"ttft_s_p{p}"], "ms")))
    for p in PERCENTILES:
        rows.append((f"latency p{p}", lambda w, p=p: _fmt(w[f"latency_s_p{p}"], "ms")))
    cells = [[label] + [get(doc["workloads"][n]) for n in names] for label, get in rows]
    header = ["", *names]
    widths = [max(len(str(row[i])) for row in [header, *cells]) for i in range(len(header))]
    lines = ["  ".join(str(c).rjust(w) if i else str(c).ljust(w)
                       for i, (c, w) in enumerate(zip(row, widths))) for row in [header, *cells]]
    server = doc["server"]
    lines.insert(0, f"{server['base_url']}  model {server['model']}"
                    + ("  (swakv: KV pools sampled from /metrics)" if server["is_swakv"] else ""))
    for name in names:
        if "first_error" in doc["workloads"][name]:
            lines.append(f"{name}: first error: {doc['workloads'][name]['first_error']}")
    return "\n".join(lines)
