"""Host KV tier on a multi-turn chat whose working set is about 4x the device pool.

S sessions share one system prompt and run T turns each (every turn's prompt is the
whole conversation so far plus a new user message; fixed output lengths). C clients
(closed loop, C = max running requests) take turns in round-robin order over the
sessions, so between two turns of a session every other session has had one: the
working set cycles through the pools. Closed loop, TTFT is about one step whatever the
hit (a slower engine just gets fewer arrivals); `--rate R` runs an open loop instead
(turns arrive at R per second, Poisson, TTFT from the arrival), where an engine that
re-prefills what it forgot falls behind the offered load and queues. The
device full pool holds about a quarter of the working set. Three runs on the real model:
  - unbounded: device pools (full and SWA) that hold everything (the hit-ratio ceiling),
  - device only: the quarter-size full pool (SWA sized by the cost model), no host tier,
  - host tier: the same pools plus a host tier of 4x the device KV budget.
Reports prefix-hit ratio, output tok/s, TTFT p50/p90 and, for the host tier, bytes
loaded per pool per host hit (SWA should be about one window, not the prefix).

    .venv/bin/python bench/host_tier.py [--sessions 128] [--turns 4] [--output-len 16]
                                        [--rate R]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_workload import Tracker, summarise, tokens  # noqa: E402

from swakv.config import EngineConfig, KVLayout  # noqa: E402
from swakv.engine.build import build_engine  # noqa: E402
from swakv.memory.pages import page_ceil  # noqa: E402
from swakv.sched.cost import CostModel  # noqa: E402
from swakv.sched.sizing import PoolSizes  # noqa: E402


def sizes_for(cfg: EngineConfig, full_tokens: int, window: int, layout: KVLayout,
              swa_tokens: int | None = None) -> PoolSizes:
    """A full pool of `full_tokens`; the SWA pool the cost model sizes for the run
    unless `swa_tokens` is given."""
    p = cfg.page_size
    cost = CostModel(window, p, cfg.chunk_size, cfg.decode_reserve, cfg.frontier_stride)
    if swa_tokens is None:
        swa_tokens = (cfg.max_running_requests * cost.swa_steady()
                      + cost.swa_prefill(cfg.chunk_size))
    nf, ns = page_ceil(full_tokens, p) // p, page_ceil(swa_tokens, p) // p
    full_bpt, swa_bpt = layout.bytes_per_token(False), layout.bytes_per_token(True)
    return PoolSizes(nf, ns, p, (nf + 1) * p * full_bpt, (ns + 1) * p * swa_bpt)


def run_sessions(eng, args) -> list:
    """Turns handed out round-robin over sessions: closed loop (`max_running` clients),
    or open loop at `args.rate` turns per second (Poisson arrivals)."""
    import random
    from collections import deque

    from swakv.sampling_params import SamplingParams

    rng = random.Random(args.seed)
    vocab = eng.spec.vocab_size
    system = [eng.spec.bos_token_id or 2] + tokens(rng, args.system_len - 1, vocab)
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    convo = {s: list(system) + tokens(rng, args.user_len, vocab) for s in range(args.sessions)}
    ready = deque((s, 1) for s in range(args.sessions))
    live: dict[str, tuple[int, int]] = {}
    done = []
    arrivals = _arrival_times(args, rng) if args.rate else None
    while ready or live:
        _admit(eng, args, ready, live, convo, params, arrivals)
        if not live:  # open loop, idle until the next arrival
            time.sleep(max(0.0, arrivals[0] - time.monotonic()))
            continue
        for out in eng.step():
            if not out.finished:
                continue
            req = out.request
            done.append(req)
            s, t = live.pop(req.request_id)
            if t < args.turns:
                convo[s] = req.token_ids + tokens(rng, args.user_len, vocab)
                ready.append((s, t + 1))
    return done


def _arrival_times(args, rng) -> list[float]:
    """Monotonic clock times of the open loop's arrivals (one per turn), from now."""
    t, times = time.monotonic(), []
    for _ in range(args.sessions * args.turns):
        t += rng.expovariate(args.rate)
        times.append(t)
    return times


def _admit(eng, args, ready, live, convo, params, arrivals) -> None:
    """Closed loop: fill the free client slots. Open loop: every arrival that is due takes
    the next ready turn; its TTFT counts from the arrival, not from when the driver got
    to it (a session whose previous turn still runs holds its arrival back)."""
    if arrivals is None:
        while ready and len(live) < args.max_running:
            s, t = ready.popleft()
            live[eng.add_request(convo[s], params).request_id] = (s, t)
        return
    now = time.monotonic()
    while ready and arrivals and arrivals[0] <= now:
        s, t = ready.popleft()
        req = eng.add_request(convo[s], params)
        req.arrival_time = arrivals.pop(0)
        live[req.request_id] = (s, t)


def run(name: str, args, full_tokens: int, host: str | None,
        swa_tokens: int | None = None) -> dict:
    cfg = EngineConfig(dtype=args.dtype, page_size=16, chunk_size=args.chunk_size,
                       max_running_requests=args.max_running, host_kv_memory=host,
                       decode_reserve=args.output_len, num_threads=args.threads)
    probe = build_engine(args.model, cfg, sizes=PoolSizes(64, 64, 16, 0, 0))
    layout = KVLayout.from_model(probe.spec, cfg.torch_dtype)
    sizes = sizes_for(cfg, full_tokens, probe.spec.window, layout, swa_tokens)
    del probe
    if host is not None:  # "4x" of this device budget
        cfg = EngineConfig(**{**asdict(cfg), "kv_memory": float(sizes.full_bytes + sizes.swa_bytes)})
    eng = build_engine(args.model, cfg, sizes=sizes)
    tracker = Tracker(layout.bytes_per_token(False), layout.bytes_per_token(True),
                      eng.spec.window)
    t0 = time.perf_counter()
    reqs = run_sessions(eng, args)
    res = asdict(summarise(name, eng, reqs, time.perf_counter() - t0, tracker))
    snap = eng.snapshot()
    c = snap.counters
    loads = max(1, c.get("load_backs", 0))
    res["extra"] = {
        "device_full_tokens": sizes.full_tokens, "device_swa_tokens": sizes.swa_tokens,
        "host_full_tokens": snap.host_total.full, "host_swa_tokens": snap.host_total.swa,
        "host_hit_tokens": c.get("host_hit_tokens", 0), "load_backs": c.get("load_backs", 0),
        "loaded_full_bytes_per_hit": c.get("loaded_full_tokens", 0) * layout.bytes_per_token(False) / loads,
        "loaded_swa_bytes_per_hit": c.get("loaded_swa_tokens", 0) * layout.bytes_per_token(True) / loads,
        "loaded_swa_tokens_per_hit": c.get("loaded_swa_tokens", 0) / loads,
        "backed_up_full_tokens": c.get("backed_up_full_tokens", 0),
        "demoted_tokens": c.get("demoted_tokens", 0),
        "host_evicted_full_tokens": c.get("host_evicted_full_tokens", 0),
        "window": eng.spec.window,
    }
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--sessions", type=int, default=128)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--system-len", type=int, default=1000)
    ap.add_argument("--user-len", type=int, default=100)
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--max-running", type=int, default=16,
                    help="clients (closed loop); the engine's max running requests")
    ap.add_argument("--rate", type=float, default=None,
                    help="open loop: turns arriving per second (Poisson); default closed loop")
    ap.add_argument("--chunk-size", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results/host_tier.json")
    args = ap.parse_args()
    per_session = args.system_len + args.turns * (args.user_len + args.output_len)
    working_set = args.system_len + args.sessions * (per_session - args.system_len)
    quarter = working_set // 4
    rows = [run("unbounded", args, 2 * working_set, None, swa_tokens=2 * working_set),
            run("device only", args, quarter, None),
            run("host tier 4x", args, quarter, "4x")]
    keys = ["prefix_hit_ratio", "output_tok_s", "ttft_p50_s", "ttft_p90_s", "wall_s",
            "retractions"]
    print(f"working set {working_set} tokens; device full pool {quarter} tokens (1/4)")
    print(f"{'run':<14}" + "".join(f"{k:>18}" for k in keys))
    for r in rows:
        print(f"{r['workload']:<14}" + "".join(
            f"{r[k]:>18.3f}" if isinstance(r[k], float) else f"{r[k]:>18}" for k in keys))
    h = rows[2]["extra"]
    print(f"host tier: {h['load_backs']} load-backs, {h['host_hit_tokens']} host-hit tokens; "
          f"per hit {h['loaded_full_bytes_per_hit'] / 2**20:.2f} MiB full, "
          f"{h['loaded_swa_bytes_per_hit'] / 2**20:.2f} MiB SWA "
          f"({h['loaded_swa_tokens_per_hit']:.0f} SWA tokens; window {h['window']})")
    hit_gap = rows[0]["prefix_hit_ratio"] - rows[2]["prefix_hit_ratio"]
    ttft_gain = rows[1]["ttft_p50_s"] / max(1e-9, rows[2]["ttft_p50_s"])
    print(f"hit ratio: host tier within {100 * hit_gap:.1f} points of unbounded (goal <= 5); "
          f"TTFT p50 {ttft_gain:.2f}x better than device only (goal >= 2)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": vars(args), "working_set_tokens": working_set,
                               "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
