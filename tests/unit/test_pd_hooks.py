"""Engine hooks PD builds on (tiny Gemma 3, no transfers): a prefill request parked
with its KV after its first token, a registered request that starts decoding from KV
written elsewhere (equal to the colocated run), failing a request outside a step."""

from __future__ import annotations

import pytest

from swakv.config import EngineConfig
from swakv.disagg.config import PDConfigError, check_pd_engine
from swakv.disagg.pd_sched import DecodeScheduler, PrefillScheduler, install
from swakv.engine.build import build_engine
from swakv.engine.core import InvalidRequest
from swakv.sampling_params import SamplingParams
from swakv.sched.sizing import PoolSizes

P, W = 4, 8
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
PROMPT = [(7 * i) % 120 + 3 for i in range(37)]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from swakv.model.testing import make_tiny_gemma3_dir

    path = tmp_path_factory.mktemp("tiny-hooks")
    make_tiny_gemma3_dir(path, num_layers=4, window=W, vocab=128, seed=1)
    return str(path)


def engine(tiny_dir):
    cfg = EngineConfig(page_size=P, chunk_size=16, max_running_requests=8, frontier_stride=4,
                       decode_reserve=8, num_threads=1)
    return build_engine(tiny_dir, cfg, sizes=PoolSizes(256, 128, P, 0, 0))


def run(eng, reqs):
    while any(not r.is_finished for r in reqs):
        eng.step()
        eng.check_integrity()


def test_prefill_scheduler_parks_the_kv_of_a_finished_pd_request(tiny_dir):
    eng = engine(tiny_dir)
    sched = PrefillScheduler(eng.cost, eng.cache, 8)
    install(eng, sched)
    pd = eng.add_request(PROMPT, SamplingParams(temperature=0, max_tokens=1), "pd")
    plain = eng.add_request(PROMPT[:20], SamplingParams(temperature=0, max_tokens=1), "plain")
    sched.keep_kv_on_finish.add("pd")
    run(eng, [pd, plain])
    assert pd.is_finished and len(pd.output_ids) == 1
    assert list(sched.held) == ["pd"] and pd.kv is not None and pd.kv.kv_len == len(PROMPT)
    assert plain.kv is None  # unmarked: freed (cached) as usual
    mapped = eng.allocator.is_swa_mapped(eng.cache.req_table.read(pd.kv.row, 0, 37))
    assert bool(mapped[28:].all())  # the SWA tail [page_floor(37 - W), 37) = [28, 37)
    eng.check_integrity()
    sched.release_held(pd, insert=True)
    eng.check_integrity()
    eng.flush_cache()
    assert eng.allocator.available() == eng.allocator.total()


def test_aborted_pd_request_is_freed_not_parked(tiny_dir):
    eng = engine(tiny_dir)
    sched = PrefillScheduler(eng.cost, eng.cache, 8)
    install(eng, sched)
    req = eng.add_request(PROMPT, SamplingParams(temperature=0, max_tokens=1), "pd")
    sched.keep_kv_on_finish.add("pd")
    eng.step()  # one chunk of 16
    assert eng.abort("pd") and not sched.held and req.kv is None
    assert "pd" not in sched.keep_kv_on_finish
    eng.check_integrity()


def test_add_decoding_continues_like_the_colocated_engine(tiny_dir):
    colocated = engine(tiny_dir)
    want = colocated.add_request(PROMPT, GREEDY)
    run(colocated, [want])
    # "prefill" elsewhere: compute the prompt in another engine, copy its KV over
    src = engine(tiny_dir)
    sched = PrefillScheduler(src.cost, src.cache, 8)
    install(src, sched)
    pre = src.add_request(PROMPT, SamplingParams(temperature=0, max_tokens=1), "p")
    sched.keep_kv_on_finish.add("p")
    run(src, [pre])
    eng = engine(tiny_dir)
    dsched = DecodeScheduler(eng.cost, eng.cache, 8, eng.kv_pool, lambda r, c: None)
    install(eng, dsched)
    req = eng.register_request(PROMPT, GREEDY, "d")
    assert req not in dsched.running and not dsched.waiting
    with pytest.raises(InvalidRequest):
        eng.add_decoding(req, 5)  # no KV yet
    kv = req.kv = eng.cache.admit(req.token_ids, eng.cache.match(req.token_ids))
    dsched.hold(req)
    eng.cache.extend_remote(kv, len(PROMPT))
    src_row = src.cache.req_table.read(pre.kv.row, 0, 37)
    dst_row = eng.cache.req_table.read(kv.row, 0, 37)
    for a, b in zip(src.kv_pool.full_k + src.kv_pool.full_v,
                    eng.kv_pool.full_k + eng.kv_pool.full_v):
        b[dst_row] = a[src_row]
    tail = slice(kv.frontier, 37)
    for a, b in zip(src.kv_pool.swa_k + src.kv_pool.swa_v, eng.kv_pool.swa_k + eng.kv_pool.swa_v):
        b[eng.allocator.translate(dst_row[tail])] = a[src.allocator.translate(src_row[tail])]
    eng.cache.mark_computed(kv, 37)
    dsched.held.pop("d")
    with pytest.raises(InvalidRequest):
        eng.add_decoding(req, 10_000)  # outside the vocabulary; nothing changed
    first = eng.add_decoding(req, pre.output_ids[0])
    assert first.new_token_ids == [want.output_ids[0]] and not first.finished
    run(eng, [req])
    assert req.output_ids == want.output_ids
    sched.release_held(pre, insert=False)
    src.check_integrity()


def test_fail_finishes_with_an_error_and_frees(tiny_dir):
    eng = engine(tiny_dir)
    req = eng.add_request(PROMPT, GREEDY, "x")
    eng.step()
    out = eng.fail("x", "peer gone")
    assert out.finished and out.error == "peer gone" and req.finish_reason.value == "error"
    assert req.kv is None and eng.fail("x", "again") is None and eng.fail("nope", "") is None
    eng.check_integrity()


@pytest.mark.parametrize("page,window,ok", [(16, 512, True), (4, 8, True), (1, 8, False),
                                            (4, 9, False), (4, 10, True), (16, None, True)])
def test_pd_needs_the_tail_pinned(page, window, ok):
    if ok:
        check_pd_engine(page, window)
    else:
        with pytest.raises(PDConfigError):
            check_pd_engine(page, window)
