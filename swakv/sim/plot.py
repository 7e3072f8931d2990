"""`swakv simulate --plot`: pool usage, throughput and queues over simulated time.

Needs matplotlib (the `plot` extra: `pip install 'swakv[plot]'`).
"""

from __future__ import annotations

from pathlib import Path

from swakv.sim.simulator import SimReport, Timeline


def throughput_series(tl: Timeline, num_buckets: int = 100) -> tuple[list[float], list[float]]:
    """(bucket mid times, output tokens per second in each bucket) over the run."""
    if len(tl.t) < 2 or tl.t[-1] <= tl.t[0]:
        return [], []
    t0, t1 = tl.t[0], tl.t[-1]
    width = (t1 - t0) / num_buckets
    per_bucket = [0] * num_buckets
    prev = 0
    for t, total in zip(tl.t, tl.output_tokens):
        k = min(num_buckets - 1, int((t - t0) / width))
        per_bucket[k] += total - prev
        prev = total
    mids = [t0 + (k + 0.5) * width for k in range(num_buckets)]
    return mids, [n / width for n in per_bucket]


def plot_timeline(tl: Timeline, report: SimReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pools = report.pools
    fig, axes = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    ax = axes[0]
    for name, used, pinned, total in (
            ("full", tl.full_used, tl.full_pinned, pools["full_tokens"]),
            ("SWA", tl.swa_used, tl.swa_pinned, pools["swa_tokens"])):
        if total:
            line, = ax.plot(tl.t, [100 * u / total for u in used], label=f"{name} used")
            ax.plot(tl.t, [100 * u / total for u in pinned], linestyle="--",
                    color=line.get_color(), label=f"{name} pinned by requests")
    ax.set_ylabel("pool use (%)")
    ax.set_ylim(0, 105)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"{report.model}: {report.trace} trace, {report.num_requests} requests")
    mids, rate = throughput_series(tl)
    axes[1].plot(mids, rate)
    axes[1].set_ylabel("output tok/s")
    ax = axes[2]
    ax.plot(tl.t, tl.running, label="running")
    ax.plot(tl.t, tl.waiting, label="waiting")
    ax.set_ylabel("requests")
    ax.set_xlabel("simulated time (s)")
    ret = ax.twinx()
    ret.plot(tl.t, tl.retractions, color="tab:red", linestyle=":", label="retractions (cum.)")
    ret.set_ylabel("retractions")
    ret.set_ylim(0, max(1, max(tl.retractions, default=0)) * 1.05)
    handles = ax.get_legend_handles_labels()
    extra = ret.get_legend_handles_labels()
    ax.legend(handles[0] + extra[0], handles[1] + extra[1], loc="upper left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
