"""A simulation report as a terminal table or JSON."""

from __future__ import annotations

from dataclasses import asdict

from swakv.plan.report import size_label
from swakv.sim.simulator import SimReport


def report_json(report: SimReport) -> dict:
    return asdict(report)


def report_table(r: SimReport) -> str:
    p, st = r.pools, r.step_time
    full_pct = 100 * r.peak_used["full_tokens"] / max(1, p["full_tokens"])
    swa_pct = 100 * r.peak_used["swa_tokens"] / max(1, p["swa_tokens"])
    lines = [
        f"simulated {r.trace} trace on {r.model}: {r.num_requests} requests "
        f"({r.num_finished} finished, {r.num_refused} refused, {r.num_failed} failed)",
        f"pools: full {size_label(p['full_bytes'])} ({p['full_tokens']:,} tokens), SWA "
        f"{size_label(p['swa_bytes'])} ({p['swa_tokens']:,} tokens); page {p['page_size']}, "
        f"chunk {p['chunk_size']}, max running {p['max_running_requests']}",
        f"step time: {st['a'] * 1e3:.3f} ms + {st['b'] * 1e6:.3f} us/token + "
        f"{st['c'] * 1e9:.4f} ns/key read ({st['source']})",
        "",
        f"{'simulated time':<24}{r.duration_s:12.1f} s",
        f"{'output throughput':<24}{r.output_tok_s:12.1f} tok/s",
        f"{'total throughput':<24}{r.total_tok_s:12.1f} tok/s (prompt + output)",
        f"{'TTFT p50/p90/p99':<24}{r.ttft_s['p50']:12.3f} {r.ttft_s['p90']:8.3f} "
        f"{r.ttft_s['p99']:8.3f} s",
        f"{'latency p50/p90/p99':<24}{r.latency_s['p50']:12.3f} {r.latency_s['p90']:8.3f} "
        f"{r.latency_s['p99']:8.3f} s",
        f"{'prefix hit ratio':<24}{r.prefix_hit_ratio:12.3f} of {r.prompt_tokens:,} prompt "
        "tokens",
        f"{'peak full pool use':<24}{r.peak_used['full_tokens']:12,} tokens ({full_pct:.1f}%), "
        f"pinned by requests {r.peak_pinned['full_tokens']:,}",
        f"{'peak SWA pool use':<24}{r.peak_used['swa_tokens']:12,} tokens ({swa_pct:.1f}%), "
        f"pinned by requests {r.peak_pinned['swa_tokens']:,}",
        f"{'retractions':<24}{r.retractions:12,}",
        f"{'peak queue':<24}{r.peak_waiting:12,} requests waiting",
        f"{'engine steps':<24}{r.num_steps:12,}",
        f"{'integrity checks':<24}{r.integrity_checks:12,} (pools at baseline at the end: "
        f"{'yes' if r.at_baseline else 'NO'})",
        f"{'wall time':<24}{r.wall_s:12.1f} s",
    ]
    if r.host:
        h = r.host
        lines.append(f"{'host tier':<24}{h.get('load_backs', 0):12,} load-backs, "
                     f"{h.get('demoted_tokens', 0):,} tokens demoted, "
                     f"{size_label(h.get('load_full_bytes', 0) + h.get('load_swa_bytes', 0))} "
                     "loaded")
    return "\n".join(lines)
