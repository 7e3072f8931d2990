"""The simulator's parts: step time, traces, the tensorless host tier, runs and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from swakv.cli import main
from swakv.config import AttentionSpec, AttnKind, EngineConfig, KVLayout, ModelSpec
from swakv.memory.copy_engine import CopyBatch, CopyDirection, InvalidCopy, PageCopy
from swakv.memory.host_pool import HostPoolSizes
from swakv.sched.sizing import PoolSizes
from swakv.sim.executor import SimClock, TokenOnlyTokenizer
from swakv.sim.host import CountingCopier, HostPageLedger
from swakv.sim.simulator import Simulator, percentile
from swakv.sim.steptime import (
    StepSample,
    StepTimeError,
    StepTimeModel,
    attention_work,
    fit_step_time,
    read_profile,
    write_profile,
)
from swakv.sim.trace import (
    Segment,
    Session,
    Trace,
    TraceError,
    Turn,
    chat_trace,
    docs_trace,
    read_jsonl,
    segment_tokens,
    write_jsonl,
)

W, PAGE = 8, 4


def tiny_spec(kinds: str = "SSFSS", window: int | None = W) -> ModelSpec:
    layers = tuple(AttentionSpec(AttnKind.SLIDING, 1, 4, 1e4, window) if k == "S"
                   else AttentionSpec(AttnKind.FULL, 1, 4, 1e6) for k in kinds)
    return ModelSpec("tiny", 128, 16, 32, 2, layers, max_position_embeddings=512)


STEP = StepTimeModel(0.01, 1e-4, 1e-6)


# ---- step time ---------------------------------------------------------------------------

@pytest.mark.parametrize(("full", "swa", "window", "prefix", "n", "expected"), [
    (2, 3, 4, 2, 3, 25),  # docstring example: one block [2, 5)
    (1, 0, None, 0, 4, 4),
    (0, 1, 4, 10, 1, 4),  # a decode far past the window reads W keys
    (1, 0, None, 10, 1, 11),
    # 300 tokens from 0: blocks [0, 128), [128, 256), [256, 300)
    (1, 0, None, 0, 300, 128 + 256 + 300),
    (0, 1, 4, 0, 300, 128 + (256 - 125) + (300 - 253)),
    (1, 1, 8, 5, 0, 0),
])
def test_attention_work(full, swa, window, prefix, n, expected) -> None:
    assert attention_work(full, swa, window, prefix, n) == expected


def test_fit_recovers_coefficients() -> None:
    rng = np.random.default_rng(0)
    samples = [StepSample(int(t), int(w), 0.02 + 3e-5 * t + 2e-9 * w)
               for t, w in zip(rng.integers(1, 4096, 50), rng.integers(0, 10**8, 50))]
    m = fit_step_time(samples)
    assert m.a == pytest.approx(0.02, rel=1e-6) and m.b == pytest.approx(3e-5, rel=1e-6)
    assert m.c == pytest.approx(2e-9, rel=1e-6) and "fitted to 50 steps" in m.source
    # a negative unconstrained slope is clamped: time falls with tokens -> b = 0
    falling = [StepSample(t, 0, 1.0 - 1e-4 * t) for t in (1, 10, 100, 1000)]
    m = fit_step_time(falling)
    assert m.b == 0 and m.c == 0 and m.a == pytest.approx(np.mean([s.seconds for s in falling]))


def test_step_time_errors(tmp_path) -> None:
    with pytest.raises(StepTimeError):
        StepTimeModel(-1, 0, 0)
    with pytest.raises(StepTimeError):
        StepTimeModel(0, 0, 0)
    with pytest.raises(StepTimeError):
        StepTimeModel.parse("1,2")
    assert StepTimeModel.parse("0.01,2e-5,3e-9").b == 2e-5
    with pytest.raises(StepTimeError):
        fit_step_time([StepSample(1, 1, 1.0)])
    write_profile(tmp_path / "p.jsonl", [StepSample(1, 2, 0.5)])
    assert read_profile(tmp_path / "p.jsonl") == [StepSample(1, 2, 0.5)]
    (tmp_path / "bad.jsonl").write_text('{"num_tokens": 1}\n')
    with pytest.raises(StepTimeError, match="bad.jsonl:1"):
        read_profile(tmp_path / "bad.jsonl")


def test_roofline() -> None:
    from swakv.plan.models import load_plan_model

    m = StepTimeModel.roofline(load_plan_model("gemma-3-27b").spec, 2)
    # ~27.0e9 parameters: 54 GB of bf16 weights at 3.35 TB/s; 8 KiB of K+V per key and layer
    assert m.a == pytest.approx(0.0161, rel=0.01) and m.c == pytest.approx(8192 / 3.35e12)


# ---- traces ------------------------------------------------------------------------------

def test_segments_are_deterministic_prefixes() -> None:
    a = segment_tokens(Segment((1, 7), 100), 1000)
    assert a == segment_tokens(Segment((1, 7), 100), 1000)
    assert a[:40] == segment_tokens(Segment((1, 7), 40), 1000)
    assert a != segment_tokens(Segment((1, 8), 100), 1000)
    assert min(a) >= 3 and max(a) < 1000


def test_chat_and_docs_shapes() -> None:
    t = chat_trace(1000, seed=1)
    assert t.num_requests == 1000
    assert all(2 <= len(s.turns) <= 8 for s in t.sessions[:-1])
    assert all(s.turns[0].segments[0].key[0] == 1 for s in t.sessions)  # a system prompt first
    assert [s.arrival for s in t.sessions] == sorted(s.arrival for s in t.sessions)
    d = docs_trace(200, seed=1)
    assert d.num_requests == 200 and all(len(s.turns) == 1 for s in d.sessions)
    lens = [s.turns[0].segments[0].length for s in d.sessions]
    assert min(lens) >= 8192 and max(lens) <= 131072


def test_jsonl(tmp_path) -> None:
    path = tmp_path / "t.jsonl"
    write_jsonl(path, [
        {"arrival": 2.0, "prompt_ids": [5, 6, 7], "output_len": 4},
        {"timestamp": 500, "hash_ids": [0, 1, 2], "input_length": 1100, "output_length": 8},
    ])
    t = read_jsonl(path)
    first, second = t.sessions  # sorted by arrival
    assert first.arrival == 0.5 and second.arrival == 2.0
    assert [s.length for s in first.turns[0].segments] == [512, 512, 76]
    assert second.turns[0].token_ids == (5, 6, 7) and second.turns[0].output_len == 4
    assert read_jsonl(path, limit=1).num_requests == 1
    for bad in ({"arrival": 0, "prompt_ids": [], "output_len": 1},
                {"arrival": 0, "hash_ids": [0, 1], "input_length": 2000, "output_len": 1},
                {"arrival": 0, "prompt_ids": [1], "output_len": 0},
                {"arrival": 0, "hash_ids": [-1], "input_length": 5, "output_len": 1}):
        write_jsonl(path, [bad])
        with pytest.raises(TraceError, match="t.jsonl:1"):
            read_jsonl(path)


# ---- host tier without tensors -----------------------------------------------------------

def test_host_ledger_and_counting_copier() -> None:
    layout = KVLayout.from_model(tiny_spec(), torch.bfloat16)
    ledger = HostPageLedger(layout, HostPoolSizes(5, 3, PAGE, 0, 0))
    assert ledger.full_k == [] and ledger.available_pages().full == 5
    pages = ledger.alloc(2, 1)
    assert pages.full_pages.tolist() == [1, 2] and pages.swa_pages.tolist() == [1]
    copier = CountingCopier(layout, (10, 4), ledger)
    copier.submit(CopyBatch(CopyDirection.BACKUP, PageCopy([7, 8], [1, 2]), PageCopy([3], [1])))
    # full pool: 1 layer x 16 B per token x 4 tokens x 2 pages; SWA: 4 layers x 16 B x 4
    assert copier.counters.backup_full_bytes == 2 * PAGE * 16
    assert copier.counters.backup_swa_bytes == PAGE * 64
    with pytest.raises(InvalidCopy):
        copier.submit(CopyBatch(CopyDirection.LOAD, PageCopy([1], [11])))  # device page 11 > 10
    with pytest.raises(InvalidCopy):
        copier.submit(CopyBatch(CopyDirection.LOAD, PageCopy([1, 2], [3, 3])))
    ledger.free(pages.full_pages, pages.swa_pages)
    ledger.check_integrity()
    with pytest.raises(TypeError):
        ledger.buffers(0)


# ---- runs --------------------------------------------------------------------------------

def small_cfg(**kw) -> EngineConfig:
    settings = dict(page_size=PAGE, kv_memory=1 << 20, chunk_size=16, max_running_requests=8,
                    decode_reserve=8, frontier_stride=4)
    settings.update(kw)
    return EngineConfig(**settings)


def shared_prefix_trace() -> Trace:
    """Three sessions sharing a 40-token system prompt, two turns each."""
    sessions = tuple(Session(0.1 * i, (
        Turn(6, (Segment((1, 0), 40), Segment((2, i, 0), 9))),
        Turn(5, (Segment((2, i, 1), 7),), think_time=0.05))) for i in range(3))
    return Trace("shared", sessions)


def test_simulator_run_exact_counts() -> None:
    sim = Simulator(tiny_spec(), small_cfg(), STEP, sizes=PoolSizes(64, 32, PAGE, 0, 0),
                    integrity_every=1)
    r = sim.run(shared_prefix_trace())
    assert (r.num_requests, r.num_finished, r.num_refused, r.num_failed) == (6, 6, 0, 0)
    assert r.output_tokens == 3 * (6 + 5)
    # prompts: 49 tokens (turn 1), 49 + 6 + 7 = 62 (turn 2)
    assert r.prompt_tokens == 3 * (49 + 62)
    assert r.integrity_checks == r.num_steps + 2  # every step, the end, the flushed end
    assert r.at_baseline and r.duration_s > 0 and r.ttft_s["p50"] <= r.latency_s["p50"]
    alloc = sim.core.allocator
    assert alloc.available() == alloc.total() and not sim.core.scheduler.running
    # second turns hit their whole first conversation's pages: page_floor(49 + 6 - 1) = 52
    # of 62 tokens; first turns after the first hit the shared system prompt (40 tokens)
    assert r.prefix_hit_ratio > 0.5
    assert len(sim.timeline.t) == r.num_steps


def test_simulator_host_tier_and_tight_pools() -> None:
    """A tight device pool with a host tier: demotions and load-backs, integrity each step.

    Second turns continue their first turn's conversation, whose end keeps a window of
    SWA on the host (an anchor), so a demoted conversation loads back."""
    cfg = small_cfg(host_kv_memory="16x", max_running_requests=4)
    sim = Simulator(tiny_spec(), cfg, STEP, sizes=PoolSizes(40, 24, PAGE, 0, 0), integrity_every=1)
    trace = Trace("tight", tuple(
        Session(0.02 * i, (Turn(4, (Segment((1, i % 3), 60), Segment((2, i), 5))),
                           Turn(4, (Segment((3, i), 6),), think_time=0.5)))
        for i in range(12)))
    r = sim.run(trace)
    assert r.num_finished == 24 and r.at_baseline
    # every step, the end, the flushed end, the end with the host copies evicted
    assert r.integrity_checks == r.num_steps + 3
    host = sim.core.cache.host.pool
    assert host.available() == host.total() and host.available().full > 0  # host baseline
    assert sim.core.allocator.available() == sim.core.allocator.total()
    assert r.host["total_tokens"] == {"full": host.total().full, "swa": host.total().swa}
    assert r.host["free_tokens_at_end"]["full"] < r.host["total_tokens"]["full"]  # held copies
    assert r.host["demoted_tokens"] > 0 and r.host["load_backs"] > 0
    assert r.host["load_full_bytes"] > 0 and r.host["backup_full_bytes"] > 0


def test_refused_and_clock() -> None:
    sim = Simulator(tiny_spec(), small_cfg(), STEP, sizes=PoolSizes(64, 32, PAGE, 0, 0))
    trace = Trace("long", (Session(5.0, (Turn(3, token_ids=tuple(range(3, 600))),)),
                           Session(5.0, (Turn(3, token_ids=(3, 4, 5)),))))
    r = sim.run(trace)
    assert (r.num_refused, r.num_finished) == (1, 1)  # 597 tokens > the 256-token full pool
    assert sim.clock.now >= 5.0  # the idle engine jumped to the first arrival


def test_percentile_and_clock() -> None:
    assert percentile([], 0.5) == 0.0
    assert percentile([3.0, 1.0, 2.0, 4.0], 0.5) == 2.0 and percentile([1.0, 2.0], 0.99) == 2.0
    from swakv.bench.report import percentile as bench_percentile

    xs = [float(x * 7 % 101) for x in range(1, 250)]
    for q in (0.5, 0.9, 0.99):  # the simulator reports the bench's nearest rank
        assert percentile(xs, q) == bench_percentile(xs, q * 100) == sorted(xs)[
            -(-int(q * 100) * len(xs) // 100) - 1]
    c = SimClock()
    c.advance(0.5)
    with pytest.raises(ValueError):
        c.advance(-1)
    assert c.now == 0.5
    assert TokenOnlyTokenizer().incremental_decoder().push(7) == ""


def test_simulate_cli(tmp_path, capsys) -> None:
    out = tmp_path / "plot.png"
    assert main(["simulate", "--model", "gemma-3-1b", "--kv-memory", "2GiB", "--requests", "40",
                 "--chunk-size", "1024", "--integrity-every", "50", "--plot", str(out)]) == 0
    text = capsys.readouterr().out
    assert "40 requests (40 finished" in text and "pools at baseline at the end: yes" in text
    assert out.stat().st_size > 10_000 and out.read_bytes()[:4] == b"\x89PNG"
    assert main(["simulate", "--model", "gemma-3-4b", "--kv-memory", "16GiB", "--trace", "docs",
                 "--requests", "3", "--json", "--step-time", "0.01,1e-5,1e-9"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["num_finished"] == 3 and data["step_time"]["a"] == 0.01
    assert len(data["timeline"]["t"]) == min(data["num_steps"], 1001)
    assert main(["simulate", "--model", "gemma-3-1b", "--kv-memory", "1GiB",
                 "--step-time", "1,2", "--requests", "1"]) == 2
    assert "a,b,c" in capsys.readouterr().err
    for trace in ("chat", "docs"):  # a zero rate is refused, not replaced by the default
        assert main(["simulate", "--model", "gemma-3-1b", "--kv-memory", "1GiB", "--trace", trace,
                     "--rate", "0", "--requests", "1"]) == 2
        assert "rate > 0" in capsys.readouterr().err


def test_failed_step_in_a_simulated_engine_fails_only_its_requests() -> None:
    """A step error is contained as in serving (`EngineCore._contain` runs the integrity
    check, which must work without KV pools): that step's request fails, the next runs."""
    from swakv.engine.core import EngineCore
    from swakv.sampling_params import SamplingParams
    from swakv.sched.request import FinishReason
    from swakv.sim.executor import SimExecutor

    spec = tiny_spec()
    core = EngineCore(spec, None, TokenOnlyTokenizer(), small_cfg(),
                      sizes=PoolSizes(64, 32, PAGE, 0, 0), executor=SimExecutor(spec, STEP))
    real = core.executor.execute
    calls = {"n": 0}

    def flaky(items, sampling):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected")
        return real(items, sampling)

    core.executor.execute = flaky
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    bad = core.add_request(list(range(3, 20)), params)
    outs = core.step()
    assert [(o.request.request_id, o.request.finish_reason) for o in outs] == [
        (bad.request_id, FinishReason.ERROR)]
    good = core.add_request(list(range(30, 40)), params)
    while core.has_unfinished():
        core.step()
        core.check_integrity()
    assert good.finish_reason is FinishReason.LENGTH and len(good.output_ids) == 3
    core.flush_cache()
    assert core.allocator.available() == core.allocator.total()
