"""PD disaggregation vs one colocated engine, over HTTP on this machine (real Gemma 3 270M).

Workloads (greedy, ignore_eos, fixed output lengths, streamed):
(a) docs: D documents of 3,000-6,000 random tokens (/v1/completions, token ids), all at once;
(b) chat: S sessions x T turns (/v1/chat/completions), a shared ~1,000-token system prompt,
    ~100-token user turns; each turn sends the whole conversation (the assistant's
    earlier answers as text); sessions run concurrently, turns in order.
Set-ups: `colocated` = one `swakv serve` (--num-threads 2); `pd` = `swakv router` +
one prefill and one decode worker (--num-threads 1 each) on loopback.

Reported per workload and set-up: TTFT p50 / p90 (client side: request sent to first
content), output tok/s (all outputs / wall time), and for PD the KV bytes moved per
request per pool (the prefill worker's backend counters) and their ratio to a
transfer that sends SWA KV for every position it sends full KV for (same full bytes,
SWA bytes x = full bytes x SWA B/token / full B/token).

    flock /tmp/swakv-cpu.lock .venv/bin/python bench/pd_workload.py --out bench/results/pd_workload.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from swakv.server.testing import ServerProcess, scrape

WORDS = ("memory window layer page token cache prefill decode transfer budget router worker "
         "river mountain silver garden lantern harbor meadow thunder velvet compass anchor "
         "orchard canyon ember glacier falcon willow marble saffron quartz beacon").split()
ENV = {"MC_LOG_LEVEL": "ERROR"}


@dataclass
class Row:
    workload: str
    setup: str
    num_requests: int
    wall_s: float
    output_tokens: int
    output_tok_s: float
    ttft_p50_s: float
    ttft_p90_s: float
    prompt_tokens: int
    cached_tokens: int
    full_bytes_per_request: float = 0.0
    swa_bytes_per_request: float = 0.0
    swa_all_bytes_per_request: float = 0.0
    bytes_ratio_vs_swa_everywhere: float = 0.0


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else 0.0


async def stream_one(client: httpx.AsyncClient, url: str, path: str, body: dict) -> dict:
    """Send one streamed request; returns ttft, text, usage."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True},
            "temperature": 0, "ignore_eos": True, "model": "gemma3-270m"}
    t0 = time.perf_counter()
    ttft, text, usage = None, [], None
    async with client.stream("POST", url + path, json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {await r.aread()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"])
            if event.get("usage"):
                usage = event["usage"]
            for c in event.get("choices", []):
                piece = c.get("text") or (c.get("delta") or {}).get("content") or ""
                if piece and ttft is None:
                    ttft = time.perf_counter() - t0
                text.append(piece)
    return {"ttft": ttft or 0.0, "text": "".join(text), "usage": usage}


async def run_docs(url: str, num_docs: int, max_tokens: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    docs = [[rng.randrange(10, 250_000) for _ in range(rng.randint(3000, 6000))]
            for _ in range(num_docs)]
    async with httpx.AsyncClient(timeout=None) as client:
        return await asyncio.gather(*(stream_one(client, url, "/v1/completions",
                                                 {"prompt": d, "max_tokens": max_tokens})
                                      for d in docs))


async def run_chat(url: str, sessions: int, turns: int, max_tokens: int, seed: int
                   ) -> list[dict]:
    rng = random.Random(seed)
    system = " ".join(rng.choice(WORDS) for _ in range(1000))
    results: list[dict] = []

    async def session(client: httpx.AsyncClient, s: int) -> None:
        r = random.Random(seed * 1000 + s)
        messages = [{"role": "system", "content": system}]
        for _ in range(turns):
            messages.append({"role": "user",
                             "content": " ".join(r.choice(WORDS) for _ in range(100))})
            out = await stream_one(client, url, "/v1/chat/completions",
                                   {"messages": messages, "max_tokens": max_tokens})
            results.append(out)
            messages.append({"role": "assistant", "content": out["text"]})

    async with httpx.AsyncClient(timeout=None) as client:
        await asyncio.gather(*(session(client, s) for s in range(sessions)))
    return results


def sent(prefill: ServerProcess | None) -> tuple[float, float]:
    if prefill is None:
        return 0.0, 0.0
    m = scrape(prefill.url)
    key = 'swakv_pd_transfer_bytes_total{direction="sent",pool="%s",role="prefill"}'
    return m[key % "full"], m[key % "swa"]


def measure(name: str, setup: str, url: str, prefill: ServerProcess | None, args,
            bpt: tuple[int, int]) -> Row:
    before = sent(prefill)
    t0 = time.perf_counter()
    if name == "docs":
        outs = asyncio.run(run_docs(url, args.docs, args.doc_tokens, args.seed))
    else:
        outs = asyncio.run(run_chat(url, args.sessions, args.turns, args.chat_tokens, args.seed))
    wall = time.perf_counter() - t0
    after = sent(prefill)
    n = len(outs)
    out_tokens = sum(o["usage"]["completion_tokens"] for o in outs)
    row = Row(name, setup, n, wall, out_tokens, out_tokens / wall,
              pct([o["ttft"] for o in outs], 0.5), pct([o["ttft"] for o in outs], 0.9),
              sum(o["usage"]["prompt_tokens"] for o in outs),
              sum(o["usage"]["prompt_tokens_details"]["cached_tokens"] for o in outs))
    if prefill is not None:
        full, swa = after[0] - before[0], after[1] - before[1]
        swa_all = full * bpt[1] / bpt[0]
        row.full_bytes_per_request, row.swa_bytes_per_request = full / n, swa / n
        row.swa_all_bytes_per_request = swa_all / n
        row.bytes_ratio_vs_swa_everywhere = (full + swa) / (full + swa_all)
    return row


def start(args_list: list[str]) -> ServerProcess:
    return ServerProcess.start(args_list, env=ENV, timeout=600)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", choices=["chat", "docs", "both"], default="both")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--kv-memory", default="2GiB")
    ap.add_argument("--docs", type=int, default=6)
    ap.add_argument("--doc-tokens", type=int, default=64)
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--chat-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results/pd_workload.json")
    args = ap.parse_args()
    names = ["docs", "chat"] if args.workload == "both" else [args.workload]
    common = ["--dtype", args.dtype, "--kv-memory", args.kv_memory, "--log-level", "warning"]
    import torch

    from swakv.config import KVLayout
    from swakv.model.loader import load_model_dir, resolve_model

    spec = load_model_dir(resolve_model(None)).spec
    layout = KVLayout.from_model(spec, torch.bfloat16 if args.dtype == "bfloat16"
                                 else torch.float32)
    bpt = (layout.bytes_per_token(False), layout.bytes_per_token(True))
    rows: list[Row] = []
    for setup in ("colocated", "pd"):
        procs: list[ServerProcess] = []
        try:
            if setup == "colocated":
                procs.append(start([*common, "--num-threads", "2"]))
                url, prefill = procs[0].url, None
            else:
                procs.append(start([*common, "--num-threads", "1", "--role", "prefill"]))
                procs.append(start([*common, "--num-threads", "1", "--role", "decode"]))
                procs.append(ServerProcess.start(
                    ["--decode", procs[1].url], env=ENV,
                    command=[sys.executable, "-m", "swakv.cli", "router", "--prefill",
                             procs[0].url, "--log-level", "warning"]))
                url, prefill = procs[2].url, procs[0]
            for name in names:
                rows.append(measure(name, setup, url, prefill, args, bpt))
                print(rows[-1], flush=True)
        finally:
            for p in procs:
                p.kill()
    print_table(rows, bpt)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"config": vars(args), "bytes_per_token": bpt,
                                          "results": [asdict(r) for r in rows]}, indent=2))
    print(f"wrote {args.out}")


def print_table(rows: list[Row], bpt: tuple[int, int]) -> None:
    kib = 1024
    print(f"\nKV bytes per token: full {bpt[0]}, SWA {bpt[1]}")
    print("| workload | set-up | requests | TTFT p50 / p90 (s) | output tok/s | prompt tokens "
          "(cached) | full KiB/req | SWA KiB/req | all-SWA transfer KiB/req (full + SWA) | "
          "bytes / all-SWA transfer |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        pd = r.setup == "pd"
        moved = (f"{r.full_bytes_per_request / kib:,.0f} | {r.swa_bytes_per_request / kib:,.0f} | "
                 f"{(r.full_bytes_per_request + r.swa_all_bytes_per_request) / kib:,.0f} | "
                 f"{r.bytes_ratio_vs_swa_everywhere:.3f}") if pd else "- | - | - | -"
        print(f"| {r.workload} | {r.setup} | {r.num_requests} | {r.ttft_p50_s:.2f} / "
              f"{r.ttft_p90_s:.2f} | {r.output_tok_s:.1f} | {r.prompt_tokens:,} "
              f"({r.cached_tokens:,}) | {moved} |")


if __name__ == "__main__":
    main()
