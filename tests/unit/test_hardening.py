"""Issue 13 findings at the engine level (tiny random Gemma 3, real EngineCore): one
test per finding, named test_fNN_*; the server-level ones are in
tests/integration/test_hardening_server.py and the allocator ones in test_allocator.py."""

from __future__ import annotations

import pytest
import torch

from swakv.cache.tree import RadixTree
from swakv.config import EngineConfig
from swakv.engine.build import build_engine
from swakv.engine.core import EngineCorrupted, InvalidRequest, PromptTooLong
from swakv.engine.llm import LLM
from swakv.memory.allocator.base import KVInvariantError
from swakv.memory.allocator.swa import SWAAllocator
from swakv.sampling_params import SamplingParams
from swakv.sched.request import FinishReason
from swakv.sched.sizing import PoolSizes

VOCAB = 128
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from swakv.model.testing import make_tiny_gemma3_dir

    path = tmp_path_factory.mktemp("tiny_hardening")
    make_tiny_gemma3_dir(path, num_layers=3, window=8, vocab=VOCAB, seed=5)
    return str(path)


def engine(tiny_dir, full_pages=256, swa_pages=256, **cfg):
    settings = dict(page_size=4, chunk_size=16, max_running_requests=8, frontier_stride=4,
                    decode_reserve=8)
    settings.update(cfg)
    return build_engine(tiny_dir, EngineConfig(**settings),
                        sizes=PoolSizes(full_pages, swa_pages, 4, 0, 0))


def run(eng, reqs, max_steps=2000):
    outs = []
    for _ in range(max_steps):
        if all(r.is_finished for r in reqs):
            return outs
        outs += eng.step()
        eng.check_integrity()
    raise AssertionError("no progress")


def at_baseline(eng) -> bool:
    eng.flush_cache()
    eng.check_integrity()
    return eng.allocator.available() == eng.allocator.total() and eng.req_table.num_free == \
        eng.req_table.num_rows


def prompt(n: int, base: int = 10) -> list[int]:
    return [base + i % 100 for i in range(n)]


def test_f01_token_ids_validated_at_submission(tiny_dir):
    # Before: stop_token_ids were never range-checked; with min_tokens >= 1 the mask
    # indexed the logits with id >= vocab inside step() and the engine died.
    eng = engine(tiny_dir)
    for bad in ([VOCAB + 5], [-1], [3, VOCAB]):
        params = SamplingParams(max_tokens=4, min_tokens=1, stop_token_ids=tuple(bad))
        with pytest.raises(InvalidRequest) as e:
            eng.add_request(prompt(5), params)
        assert e.value.param == "stop_token_ids"
    for bad in ([VOCAB], [-2, 5]):
        with pytest.raises(InvalidRequest) as e:
            eng.add_request(bad, GREEDY)
        assert e.value.param == "prompt"
    assert not eng.has_unfinished() and not eng.requests
    ok = eng.add_request(prompt(5), SamplingParams(max_tokens=4, min_tokens=2,
                                                   stop_token_ids=(VOCAB - 1,)))
    run(eng, [ok])
    assert ok.finish_reason is not FinishReason.ERROR and at_baseline(eng)


class Boom(RuntimeError):
    pass


def fail_forward_on(eng, calls: set[int]):
    """Make the model forward raise on the given (1-based) call numbers."""
    real = eng.runner.forward
    count = [0]

    def forward(items, *a, **kw):
        count[0] += 1
        if count[0] in calls:
            raise Boom(f"injected at forward call {count[0]}")
        return real(items, *a, **kw)

    eng.runner.forward = forward
    return count


def test_f03_failed_step_fails_only_its_requests(tiny_dir):
    # Reference outputs from a clean engine.
    ref = engine(tiny_dir)
    ps = [prompt(5, 10), prompt(9, 20), prompt(30, 30)]
    ref_reqs = [ref.add_request(p, GREEDY) for p in ps]
    run(ref, ref_reqs)
    # max_running 2: the third request waits outside the failing step.
    eng = engine(tiny_dir, max_running_requests=2)
    fail_forward_on(eng, {3})
    reqs = [eng.add_request(p, GREEDY) for p in ps]
    outs = run(eng, reqs)
    failed = [o for o in outs if o.error is not None]
    assert {o.request.request_id for o in failed} == {reqs[0].request_id, reqs[1].request_id}
    assert all(o.finished and "Boom" in o.error for o in failed)
    assert reqs[0].finish_reason is FinishReason.ERROR and reqs[1].finish_reason is FinishReason.ERROR
    assert reqs[2].finish_reason is FinishReason.LENGTH
    assert reqs[2].output_ids == ref_reqs[2].output_ids
    assert eng.metrics.num_failed == 2
    # the engine keeps serving, and every page came back
    again = eng.add_request(ps[0], GREEDY)
    run(eng, [again])
    assert again.output_ids == ref_reqs[0].output_ids
    assert at_baseline(eng)


def test_f03_failure_in_schedule_fails_its_touched_requests(tiny_dir):
    # Step 1 (chunk budget 16) prefills A and B (6 tokens each) and 4 tokens of C. In
    # step 2 the decode allocation for A and B raises after taking slots: A and B fail,
    # C (not reached by the failing step) goes on; every slot comes back.
    eng = engine(tiny_dir)
    a, b, c = (eng.add_request(prompt(6, 40 + i), GREEDY) for i in range(3))
    eng.step()
    real = eng.cache.decode

    def decode(kvs):
        real(kvs)
        raise Boom("after allocating decode slots")

    eng.cache.decode = decode
    outs = eng.step()
    assert {o.request.request_id for o in outs if o.error} == {a.request_id, b.request_id}
    eng.cache.decode = real
    run(eng, [c])
    assert c.finish_reason is FinishReason.LENGTH and len(c.output_ids) == 6
    assert at_baseline(eng)


def test_f03_broken_bookkeeping_raises_engine_corrupted(tiny_dir):
    eng = engine(tiny_dir)
    req = eng.add_request(prompt(6), GREEDY)
    fail_forward_on(eng, {2})
    eng.step()
    eng.cache.release = lambda kv: None  # the failed request's KV is "lost"
    with pytest.raises(EngineCorrupted):
        eng.step()
    assert req.finish_reason is FinishReason.ERROR


def test_f05_alloc_extend_invariant_branch_unreachable_from_engine(tiny_dir):
    # Random engine workloads with tight pools, chunked prefill, prefix sharing and
    # retraction never reach the raise (it would fail the request with an error).
    raised = []
    real = SWAAllocator.alloc_extend

    def spy(self, *a, **kw):
        try:
            return real(self, *a, **kw)
        except KVInvariantError as e:
            raised.append(e)
            raise

    SWAAllocator.alloc_extend = spy
    try:
        g = torch.Generator().manual_seed(0)
        for page, chunk in [(1, 3), (4, 5), (4, 16), (16, 7)]:
            eng = build_engine(tiny_dir, EngineConfig(
                page_size=page, chunk_size=chunk, max_running_requests=5, frontier_stride=2,
                decode_reserve=2), sizes=PoolSizes(200 // page, 64 // page + 4, page, 0, 0))
            shared = prompt(20, 70)
            reqs = []
            for i in range(10):
                n = int(torch.randint(1, 60, (1,), generator=g))
                p = (shared if i % 2 else []) + prompt(n, 3 + i)
                reqs.append(eng.add_request(p, SamplingParams(temperature=0, max_tokens=8,
                                                              ignore_eos=True)))
            run(eng, reqs)
            assert all(r.finish_reason is FinishReason.LENGTH for r in reqs)
            assert at_baseline(eng)
    finally:
        SWAAllocator.alloc_extend = real
    assert raised == []


def test_f06_failed_step_releases_what_it_allocated(tiny_dir):
    # Before: slots were allocated in schedule(); when forward raised, alloc_len stayed
    # above kv_len and the next schedule overwrote the row (pages lost for good).
    eng = engine(tiny_dir, enable_prefix_cache=False)
    total = eng.allocator.total()
    req = eng.add_request(prompt(13), GREEDY)
    fail_forward_on(eng, {1})
    outs = eng.step()
    assert [o.request for o in outs] == [req] and outs[0].error
    assert eng.allocator.available() == total and eng.req_table.num_free == 8
    eng.check_integrity()


def test_f06_llm_validates_all_prompts_before_adding_any(tiny_dir):
    llm = LLM.__new__(LLM)
    llm.engine = engine(tiny_dir, full_pages=16)  # 64-token pool: max_context 64
    llm.tokenizer = llm.engine.tokenizer
    with pytest.raises(PromptTooLong):
        llm.generate([prompt(5), prompt(6), prompt(100)], GREEDY)
    assert not llm.engine.has_unfinished() and not llm.engine.requests
    with pytest.raises(InvalidRequest):
        llm.generate([prompt(5), [VOCAB + 1]], GREEDY)
    assert not llm.engine.has_unfinished()
    out = llm.generate([prompt(5), prompt(6)], GREEDY)
    assert [len(o.token_ids) for o in out] == [6, 6]


def test_f07_no_step_spins_while_work_is_admitted(tiny_dir):
    # Every step either runs a batch or finishes something while requests are live.
    eng = engine(tiny_dir, full_pages=24, swa_pages=12, chunk_size=8, max_running_requests=4)
    reqs = [eng.add_request(prompt(n, n), SamplingParams(temperature=0, max_tokens=12,
                                                         ignore_eos=True))
            for n in (3, 17, 40, 9, 25, 33)]
    for _ in range(2000):
        if not eng.has_unfinished():
            break
        steps, finished = eng.metrics.num_steps, eng.metrics.num_finished
        eng.step()
        eng.check_integrity()
        assert eng.metrics.num_steps > steps or eng.metrics.num_finished > finished
    assert all(r.is_finished for r in reqs) and at_baseline(eng)


def test_f09_page_commit_cost_is_independent_of_length(tiny_dir):
    # Count the tree nodes each page commit touches (LRU pushes): the same at 40 and at
    # 1,600 tokens. Before, every commit rebuilt the key from 0, concatenated the whole
    # path and re-locked to the root: O(L).
    eng = engine(tiny_dir, full_pages=600, swa_pages=64)
    pushes = [0]
    real = RadixTree._push

    def counting(self, n):
        pushes[0] += 1
        return real(self, n)

    RadixTree._push = counting
    try:
        req = eng.add_request(prompt(8), SamplingParams(temperature=0, max_tokens=1700,
                                                        ignore_eos=True))
        per_commit: dict[int, int] = {}
        real_commit = eng.cache.cache_unfinished

        def commit(kv, **kw):
            before = pushes[0]
            real_commit(kv, **kw)
            per_commit[kv.protected_len] = pushes[0] - before

        eng.cache.cache_unfinished = commit
        while not req.is_finished:
            eng.step()
    finally:
        RadixTree._push = real
    early = [per_commit[p] for p in range(40, 80, 4)]
    late = [per_commit[p] for p in range(1600, 1640, 4)]
    assert max(late) <= max(early) <= 12, (early, late)
