"""The simulator and the real engine make the same decisions, step for step.

Both run `EngineCore` with the same config and pool sizes on the tiny random Gemma 3;
the real one runs the model (`ModelExecutor` over KV pools), the simulated one a
`SimExecutor` (no model, no KV tensors). A fixed trace (shared prefixes, chunked
prompts, pools tight enough to evict and retract) is fed at the same steps; the logs
of admitted (with their hit lengths), chunked, decoded, retracted and finished
requests must be equal. Prompts never contain another request's outputs (real and
simulated tokens differ) and all requests ignore EOS, so no decision depends on the
sampled ids themselves.
"""

from __future__ import annotations

import random

import pytest

from swakv.config import EngineConfig
from swakv.engine.build import build_engine
from swakv.engine.core import EngineCore
from swakv.sampling_params import SamplingParams
from swakv.sched.sizing import PoolSizes
from swakv.sim.decisions import drive_by_steps
from swakv.sim.executor import SimExecutor, TokenOnlyTokenizer
from swakv.sim.steptime import StepTimeModel

WINDOW, PAGE = 8, 4


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from swakv.model.testing import make_tiny_gemma3_dir

    path = tmp_path_factory.mktemp("tiny")
    make_tiny_gemma3_dir(path, num_layers=4, window=WINDOW, vocab=128, seed=0)
    return str(path)


def fixed_trace(seed: int = 3) -> dict[int, list[tuple[str, list[int], SamplingParams]]]:
    """14 requests over 20 steps: 8 share a 24-token system prefix; prompts 5-70 tokens,
    3-14 outputs. Each suffix starts with a distinct token, so no prompt extends
    another request's prompt (and so never reaches its outputs)."""
    rng = random.Random(seed)
    system = [rng.randrange(3, 128) for _ in range(24)]
    arrivals: dict[int, list] = {}
    for k in range(14):
        n = rng.randrange(5, 70)
        suffix = [20 + k] + [rng.randrange(3, 128) for _ in range(n - 1)]
        prompt = (system + suffix) if k % 7 < 4 else suffix
        params = SamplingParams(temperature=0, max_tokens=rng.randrange(3, 15), ignore_eos=True)
        arrivals.setdefault(rng.randrange(0, 20), []).append((f"r{k}", prompt, params))
    return arrivals


@pytest.mark.parametrize(("full_pages", "swa_pages", "prefix_cache"), [
    (32, 12, True),  # tight: evicts and retracts
    (400, 400, True),  # roomy: many hits, no retraction
    (30, 14, False),  # no prefix cache (ChunkCache): retracts too
])
def test_same_decisions_step_for_step(tiny_dir, full_pages, swa_pages, prefix_cache) -> None:
    cfg = EngineConfig(page_size=PAGE, chunk_size=16, max_running_requests=6, decode_reserve=4,
                       frontier_stride=4, enable_prefix_cache=prefix_cache)
    sizes = PoolSizes(full_pages, swa_pages, PAGE, 0, 0)
    real = build_engine(tiny_dir, cfg, sizes=sizes)
    sim = EngineCore(real.spec, None, TokenOnlyTokenizer(), cfg, sizes=sizes,
                     executor=SimExecutor(real.spec, StepTimeModel(0.01, 1e-4, 1e-6)))
    assert sim.kv_pool is None and real.kv_pool is not None
    real_log = drive_by_steps(real, fixed_trace())
    sim_log = drive_by_steps(sim, fixed_trace())
    assert len(sim_log.steps) == len(real_log.steps)
    # integrity held after every step of both engines (pools included for the real one)
    assert real_log.integrity_checks == sim_log.integrity_checks == len(real_log.steps)
    for k, (a, b) in enumerate(zip(real_log.steps, sim_log.steps)):
        assert a == b, f"step {k} differs"
    finished = [f for s in real_log.steps for f in s.finished]
    assert len(finished) == 14 and all(reason == "length" for _, reason, _, _ in finished)
    items = [i for s in real_log.steps for i in s.items]
    assert any(n == 16 for _, _, n in items)  # full chunks
    assert any(p > 0 and n > 1 for _, p, n in items)  # later chunks or hits
    last = real_log.steps[-1]
    if prefix_cache:
        assert last.prefix_hit_tokens > 0
    if full_pages <= 32:
        assert last.num_retractions > 0
    retracted = [r for s in real_log.steps for r in s.retracted]
    assert len(retracted) == last.num_retractions  # each retraction named once, by request
    for engine in (real, sim):
        engine.flush_cache()
        assert engine.allocator.available() == engine.allocator.total()


def test_profile_engine_times_every_step(tiny_dir) -> None:
    """The real engine's steps, timed for `fit_step_time`: one sample per executed step,
    whose tokens add up to every prompt and output token computed."""
    from swakv.sim.profile import profile_engine
    from swakv.sim.steptime import fit_step_time

    cfg = EngineConfig(page_size=PAGE, chunk_size=16, max_running_requests=6, decode_reserve=4,
                       frontier_stride=4)
    real = build_engine(tiny_dir, cfg, sizes=PoolSizes(400, 400, PAGE, 0, 0))
    executor = real.executor
    samples = profile_engine(real, num_requests=8, prompt_len=(4, 40), output_len=(2, 6),
                             max_concurrent=4)
    assert real.executor is executor  # unwrapped again
    assert len(samples) == real.metrics.num_steps
    assert sum(s.num_tokens for s in samples) == real.metrics.num_scheduled_tokens
    assert all(s.seconds > 0 and s.attention_work > 0 for s in samples)
    model = fit_step_time(samples)
    assert model.a + model.b + model.c > 0 and model.source.startswith("fitted")
