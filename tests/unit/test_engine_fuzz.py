"""Random workloads through the tiny model with tight pools: no deadlock, no leak."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swakv.config import EngineConfig
from swakv.engine.build import build_engine
from swakv.sampling_params import SamplingParams
from swakv.sched.sizing import PoolSizes

WINDOW = 8
VOCAB = 64


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from swakv.model.testing import make_tiny_gemma3_dir

    path = tmp_path_factory.mktemp("tiny_fuzz")
    make_tiny_gemma3_dir(path, num_layers=3, window=WINDOW, vocab=VOCAB, hidden=32, heads=2,
                         kv_heads=1, head_dim=16, intermediate=64, seed=1)
    return str(path)


request_st = st.fixed_dictionaries(
    {
        "prefix": st.integers(0, 2),  # which shared prefix (0: none)
        "length": st.integers(1, 8 * WINDOW),
        "max_tokens": st.integers(1, 20),
        "abort_at": st.one_of(st.none(), st.integers(0, 30)),
        "seed": st.integers(0, 1000),
    }
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    page=st.sampled_from([1, 4]),
    chunk=st.sampled_from([3, 8, 16, 40]),
    full_pages_extra=st.integers(0, 40),
    swa_pages=st.integers(8, 40),
    prefix_cache=st.booleans(),
    reqs=st.lists(request_st, min_size=1, max_size=10),
    temperature=st.sampled_from([0.0, 1.0]),
)
def test_random_workloads_finish(tiny_dir, page, chunk, full_pages_extra, swa_pages,
                                 prefix_cache, reqs, temperature):
    longest = 8 * WINDOW + 4 * WINDOW + 20
    full_pages = -(-longest // page) + full_pages_extra
    swa_pages = max(swa_pages * 4 // page, -(-(2 * WINDOW + 4 * page) // page))
    cfg = EngineConfig(page_size=page, chunk_size=chunk, max_running_requests=6,
                       frontier_stride=2, decode_reserve=2, enable_prefix_cache=prefix_cache)
    eng = build_engine(tiny_dir, cfg, sizes=PoolSizes(full_pages, swa_pages, page, 0, 0))
    prefixes = {0: [], 1: [5 + i % 50 for i in range(2 * WINDOW + 3)],
                2: [7 + (3 * i) % 50 for i in range(4 * WINDOW)]}
    live = []
    for spec in reqs:
        body = [(spec["seed"] * 7 + 3 * i) % (VOCAB - 3) + 3 for i in range(spec["length"])]
        prompt = (prefixes[spec["prefix"]] + body)[: 8 * WINDOW + 4 * WINDOW]
        params = SamplingParams(temperature=temperature, max_tokens=spec["max_tokens"],
                                seed=spec["seed"], ignore_eos=True)
        live.append((eng.add_request(prompt, params), spec["abort_at"]))
    steps = 0
    while any(not r.is_finished for r, _ in live):
        for r, abort_at in live:
            if abort_at is not None and abort_at == steps and not r.is_finished:
                assert eng.abort(r.request_id)
        ran, ended = eng.metrics.num_steps, eng.metrics.num_finished
        eng.step()
        eng.check_integrity()
        if eng.has_unfinished():  # no silent spin: each step runs a batch or ends requests
            assert eng.metrics.num_steps > ran or eng.metrics.num_finished > ended
        steps += 1
        assert steps < 2000, "no progress: deadlock or livelock"
    for r, _ in live:
        assert r.is_finished
        assert r.finish_reason.value != "error", r.error
        if r.finish_reason.value != "abort":
            assert r.num_output_tokens == r.params.max_tokens
    eng.flush_cache()
    eng.check_integrity()
    assert eng.allocator.available() == eng.allocator.total()
