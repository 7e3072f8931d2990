"""The `--plot FILE.png` picture of a run: output throughput, TTFT and (swakv only)
KV pool usage over time, on one shared time axis. Needs matplotlib (the `plot`
extra: pip install 'swakv[plot]'); drawn off-screen (Agg), no display needed."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def plot_run(doc: dict[str, Any], path: str | Path) -> Path:
    """Draw `doc` (report.to_json's dict) into the PNG `path` and return it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable("--plot needs matplotlib: pip install 'swakv[plot]'") from None
    timeline = doc["timeline"]
    pools = timeline["kv_pools"]
    rows = 3 if pools else 2
    fig, axes = plt.subplots(rows, 1, figsize=(10, 2.8 * rows), sharex=True)
    server = doc["server"]
    fig.suptitle(f"swakv bench serve: {server['model']} at {server['base_url']}")

    ax = axes[0]
    tput, bin_s = timeline["output_tok_s"], timeline["bin_s"]
    edges = [t for t, _ in tput] + [tput[-1][0] + bin_s]
    ax.stairs([v for _, v in tput], edges, color="tab:blue", fill=True, alpha=0.7)
    ax.set_ylabel("output tok/s")
    _shade_workloads(ax, timeline["workload_spans"])

    ax = axes[1]
    for workload, color in (("chat", "tab:orange"), ("docs", "tab:green")):
        points = [(t, v) for t, v, w in timeline["ttft"] if w == workload]
        if points:
            ax.scatter([t for t, _ in points], [v * 1000 for _, v in points], s=10,
                       color=color, label=workload)
    ax.set_ylabel("TTFT ms (at send)")
    ax.legend(loc="upper right")

    if pools:
        ax = axes[2]
        t = [s["time"] for s in pools]
        for pool, color in (("full", "tab:purple"), ("swa", "tab:red")):
            total = [max(s[f"{pool}_total"], 1.0) for s in pools]
            used = [100 * s[f"{pool}_used"] / n for s, n in zip(pools, total)]
            pinned = [100 * s[f"{pool}_requests"] / n for s, n in zip(pools, total)]
            ax.plot(t, used, color=color, label=f"{pool} used (incl. cache)")
            ax.plot(t, pinned, color=color, linestyle="--", label=f"{pool} held by requests")
        ax.set_ylabel("KV pool %")
        ax.set_ylim(0, 105)
        ax.legend(loc="upper right", fontsize="small")
    axes[-1].set_xlabel("seconds since start")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _shade_workloads(ax, spans: dict[str, list[float]]) -> None:
    for (name, (start, end)), color in zip(spans.items(), ("#fff0e0", "#e8f6e8")):
        ax.axvspan(start, end, color=color, zorder=0)
        ax.text(start, 1.0, f" {name}", transform=ax.get_xaxis_transform(), va="top",
                fontsize="small")
