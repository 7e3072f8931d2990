"""PD KV transfer over Mooncake on loopback TCP: per-run descriptors vs a staging buffer.

Two processes (prefill = sender, decode = receiver), each with real KV pools in the
Gemma 3 270M layout (18 layers: 15 sliding with W = 512, 3 full; 1 KV head of dim
256; bf16; page 16: 8 KiB per page per tensor). For prompts of 1k, 3k and 6k tokens
the decode side preallocates with `alloc_extend_swa_tail`, the prefill side
allocates the prompt, and one request's full KV and SWA tail move:
- descriptors: one descriptor per run of pages contiguous on both sides, per tensor;
- staging:     pack on the sender, a few 4 MiB descriptors, unpack on the receiver;
- auto:        the default rule (kv_transfer.STAGING_MAX_MEAN_DESCRIPTOR_BYTES) picks.
Each timing runs from the send until the receiver acknowledged the KVWritten
notice (after unpacking, when staged), control messages over a pipe in both modes.

Page layouts (both sides prepared the same way with real allocators):
- contiguous: fresh pools, every span is one run;
- churned:    pools after random request churn (runs of a few pages);
- scattered:  pools whose free list is a random permutation (every page its own run).
A sweep over synthetic run lengths (1..16 pages, L = 6k) locates the crossover that
`kv_transfer.STAGING_MAX_MEAN_DESCRIPTOR_BYTES` encodes.

    flock /tmp/swakv-cpu.lock python bench/pd_transfer.py [--reps 7] \
        [--out bench/results/pd_transfer.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from swakv.config import AttentionSpec, AttnKind, KVLayout
from swakv.disagg.kv_transfer import (
    STAGING_CHUNK_BYTES,
    KVReceiver,
    KVSender,
    RemoteKV,
    StagingArea,
    TransferMode,
)
from swakv.disagg.plan import plan_transfer, row_pages, swa_row_pages
from swakv.disagg.transfer import MooncakeBackend
from swakv.memory.allocator import SWAAllocator
from swakv.memory.kv_pool import KVPool
from swakv.memory.pages import swa_tail_len

PAGE = 16
WINDOW = 512
PROMPTS = (1024, 3072, 6144)
LAYOUTS = ("contiguous", "churned", "scattered")
RUN_SWEEP = (1, 2, 4, 6, 8, 12, 16, 32)
CHUNK_SWEEP_MIB = (1, 4, 16, 64)
FULL_PAGES = 1200  # 19k tokens: the prompt plus room to churn
SWA_PAGES = 400
STAGING_BYTES = 64 << 20


def gemma3_270m_layout() -> KVLayout:
    """18 layers, every 6th full (config.json layer_types), bf16 KV."""
    sliding = AttentionSpec(AttnKind.SLIDING, 1, 256, 10_000.0, window=WINDOW)
    full = AttentionSpec(AttnKind.FULL, 1, 256, 1_000_000.0)
    layers = tuple(full if (i + 1) % 6 == 0 else sliding for i in range(18))
    return KVLayout(layers=layers, dtype=torch.bfloat16)


def make_pool(layout_name: str, seed: int) -> KVPool:
    """Pools whose free lists are in the named state (see the module docstring)."""
    a = SWAAllocator(FULL_PAGES, SWA_PAGES, PAGE)
    rng = np.random.default_rng(seed)
    if layout_name == "scattered":
        # every page allocated alone, then freed in random order: the free rings
        # (FIFO) become random permutations
        singles = [a.alloc(PAGE) for _ in range(SWA_PAGES)]
        singles += [a.alloc_extend_swa_tail(PAGE, 0) for _ in range(FULL_PAGES - SWA_PAGES)]
        for i in rng.permutation(len(singles)):
            a.free(singles[int(i)])
    elif layout_name == "churned":
        live: list[torch.Tensor] = []
        for _ in range(400):
            if live and (rng.random() < 0.5 or a.swa_available() < 64 * PAGE):
                a.free(live.pop(int(rng.integers(len(live)))))
            else:
                n = int(rng.integers(1, 64)) * PAGE
                if a.full_available() >= n and a.swa_available() >= n:
                    live.append(a.alloc(n))
        for row in live:
            a.free(row)
    a.check_integrity()
    pool = KVPool(gemma3_270m_layout(), a)
    g = torch.Generator().manual_seed(seed)
    for t in pool.full_k + pool.full_v + pool.swa_k + pool.swa_v:
        t.copy_(torch.randn(t.shape, generator=g).to(t.dtype))
    return pool


def synthetic_pages(num: int, run: int, offset: int) -> np.ndarray:
    """`num` pages in runs of `run` consecutive pages, one page gap between runs."""
    i = np.arange(num)
    return (1 + offset + (i // run) * (run + 1) + i % run).astype(np.int64)


def span_digest(pool: KVPool, plan, full_pages, swa_pages) -> str:
    """Hash of the plan's spans' bytes in the pool (verification, not timed)."""
    import hashlib

    from swakv.disagg.descriptors import kv_tensors, span_slot_ids

    h = hashlib.sha256()
    full, swa = kv_tensors(pool)
    for tensors, span, pages in ((full, plan.full, full_pages), (swa, plan.swa, swa_pages)):
        ids = torch.as_tensor(span_slot_ids(pages, span))
        for t in tensors:
            h.update(t[ids].cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---- receiver (decode) process ------------------------------------------------------------


def receiver_main(conn, threads: int) -> None:
    torch.set_num_threads(threads)
    backend = MooncakeBackend()
    pools = {name: make_pool(name, seed=100 + i) for i, name in enumerate(LAYOUTS)}
    staging = StagingArea(STAGING_BYTES, "cpu")
    receivers = {name: KVReceiver(backend, pool, staging) for name, pool in pools.items()}
    conn.send((backend.session_id, {n: r.regions for n, r in receivers.items()},
               staging.region))
    state = None
    while (msg := conn.recv()) is not None:
        kind = msg[0]
        if kind == "prealloc":  # ("prealloc", layout, L, run or None)
            _, name, seq_len, run = msg
            pool, plan = pools[name], plan_transfer(0, seq_len, WINDOW, PAGE)
            if run is None:
                row = pool.allocator.alloc_extend_swa_tail(seq_len, swa_tail_len(seq_len, WINDOW, PAGE))
                full_pages = row_pages(row, plan.full)
                swa_pages = swa_row_pages(row, plan.swa, pool.allocator.full_to_swa_page)
            else:
                row = None
                full_pages = synthetic_pages(plan.full.num_pages, run, 7)
                swa_pages = synthetic_pages(plan.swa.num_pages, run, 3)
            offset = receivers[name].reserve_staging(plan)
            state = (name, plan, row, full_pages, swa_pages, offset)
            conn.send((full_pages, swa_pages, offset))
        elif kind == "written":  # ("written", staged, want_digest)
            name, plan, row, full_pages, swa_pages, offset = state
            t0 = time.perf_counter()
            receivers[name].complete(plan, full_pages, swa_pages, offset, msg[1])
            unpack_s = time.perf_counter() - t0
            digest = span_digest(pools[name], plan, full_pages, swa_pages) if msg[2] else None
            if row is not None:
                pools[name].allocator.free(row)
            conn.send((unpack_s, digest))
    backend.close()


# ---- sender (prefill) process -----------------------------------------------------------


class Sender:
    def __init__(self, conn) -> None:
        self.conn = conn
        self.backend = MooncakeBackend()
        self.pools = {name: make_pool(name, seed=i) for i, name in enumerate(LAYOUTS)}
        self.staging = StagingArea(STAGING_BYTES, "cpu")
        session, regions, staging_region = conn.recv()
        peer = self.backend.connect(session)
        self.remotes = {n: RemoteKV(peer, r, staging_region) for n, r in regions.items()}
        self.senders = {
            (name, mode): KVSender(self.backend, pool, self.staging, mode)
            for name, pool in self.pools.items()
            for mode in TransferMode
        }
        for mib in CHUNK_SWEEP_MIB:
            self.senders[("scattered", f"staging/{mib}MiB")] = KVSender(
                self.backend, self.pools["scattered"], self.staging, TransferMode.STAGING, mib << 20)

    def one(self, name: str, seq_len: int, mode: str, run: int | None, verify: bool):
        """One request's transfer; returns (seconds, descriptors, unpack seconds, staged)."""
        pool, plan = self.pools[name], plan_transfer(0, seq_len, WINDOW, PAGE)
        self.conn.send(("prealloc", name, seq_len, run))
        dst_full, dst_swa, dst_offset = self.conn.recv()
        if run is None:
            row = pool.allocator.alloc(seq_len)
            src_full = row_pages(row, plan.full)
            src_swa = swa_row_pages(row, plan.swa, pool.allocator.full_to_swa_page)
        else:
            row = None
            src_full = synthetic_pages(plan.full.num_pages, run, 0)
            src_swa = synthetic_pages(plan.swa.num_pages, run, 0)
        t0 = time.perf_counter()
        sent = self.senders[(name, mode)].send(self.remotes[name], plan, src_full, src_swa,
                                               dst_full, dst_swa, dst_offset)
        sent.handle.wait(60)
        self.conn.send(("written", sent.staged, verify))
        unpack_s, digest = self.conn.recv()
        elapsed = time.perf_counter() - t0
        if verify and digest != span_digest(pool, plan, src_full, src_swa):
            raise AssertionError(f"{name} L={seq_len} {mode}: destination bytes differ")
        if row is not None:
            pool.allocator.free(row)
        return elapsed, sent.handle.num_slices, unpack_s, sent.staged

    def measure(self, name, seq_len, mode, run, reps) -> dict:
        self.one(name, seq_len, mode, run, verify=True)  # warm-up, checks the bytes
        samples = [self.one(name, seq_len, mode, run, verify=False) for _ in range(reps)]
        times = sorted(s[0] for s in samples)
        plan = plan_transfer(0, seq_len, WINDOW, PAGE)
        nbytes = (plan.full.num_tokens * self.remotes[name].regions.bytes_per_token("full")
                  + plan.swa.num_tokens * self.remotes[name].regions.bytes_per_token("swa"))
        return {
            "layout": name if run is None else f"runs of {run}",
            "seq_len": seq_len,
            "mode": str(mode),
            "staged": samples[0][3],
            "bytes": nbytes,
            "descriptors": samples[0][1],
            "median_ms": statistics.median(times) * 1e3,
            "min_ms": times[0] * 1e3,
            "unpack_median_ms": statistics.median(s[2] for s in samples) * 1e3,
            "mb_per_s": nbytes / statistics.median(times) / 1e6,
        }


def print_rows(rows: list[dict]) -> None:
    print(f"{'layout':<12}{'L':>6}{'mode':>15}{'MB':>7}{'descs':>7}{'median ms':>11}"
          f"{'min ms':>8}{'unpack ms':>11}{'MB/s':>8}")
    for r in rows:
        mode = r["mode"] if r["mode"] != "auto" else f"auto:{'staged' if r['staged'] else 'descs'}"
        print(f"{r['layout']:<12}{r['seq_len']:>6}{mode:>15}{r['bytes'] / 1e6:>7.1f}"
              f"{r['descriptors']:>7}{r['median_ms']:>11.1f}{r['min_ms']:>8.1f}"
              f"{r['unpack_median_ms']:>11.2f}{r['mb_per_s']:>8.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--out", default="bench/results/pd_transfer.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("MC_LOG_LEVEL", "ERROR")  # Mooncake logs INFO lines per engine

    ctx = mp.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    proc = ctx.Process(target=receiver_main, args=(child_conn, args.threads))
    proc.start()
    sender = None
    try:
        sender = Sender(conn)
        modes = (TransferMode.DESCRIPTORS, TransferMode.STAGING)
        rows = [sender.measure(name, seq_len, mode, None, args.reps)
                for seq_len in PROMPTS for name in LAYOUTS for mode in TransferMode]
        sweep = [sender.measure("contiguous", PROMPTS[-1], mode, run, args.reps)
                 for run in RUN_SWEEP for mode in modes]
        chunks = [sender.measure("scattered", PROMPTS[-1], f"staging/{mib}MiB", None, args.reps)
                  for mib in CHUNK_SWEEP_MIB]
        conn.send(None)
        proc.join(30)
        stats = sender.backend.stats()
    finally:
        if sender is not None:
            sender.backend.close()
        if proc.is_alive():
            proc.kill()
            proc.join(10)

    print(f"loopback TCP, Mooncake, page {PAGE}, W {WINDOW}, bf16, reps {args.reps}, "
          f"torch threads {args.threads}, staging chunk {STAGING_CHUNK_BYTES >> 20} MiB")
    print_rows(rows)
    print(f"\ncrossover sweep, L = {PROMPTS[-1]}, page lists in runs of k pages")
    print_rows(sweep)
    print(f"\nstaging chunk size, scattered, L = {PROMPTS[-1]}")
    print_rows(chunks)
    print(f"\nbackend counters: {dict(stats.bytes_by_pool)}, completed {stats.num_completed}, "
          f"failed {stats.num_failed}, max latency {stats.latency_max_s * 1e3:.1f} ms")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "bench": "pd_transfer",
        "transport": "mooncake tcp loopback",
        "page_size": PAGE,
        "window": WINDOW,
        "reps": args.reps,
        "threads": args.threads,
        "staging_chunk_bytes": STAGING_CHUNK_BYTES,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "results": rows,
        "run_sweep": sweep,
        "chunk_sweep": chunks,
    }, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
