"""Engine and scheduler on the tiny random Gemma 3: batching, retraction, limits."""

from __future__ import annotations

import pytest
import torch

from swakv.config import EngineConfig
from swakv.engine.build import build_engine
from swakv.engine.core import EmptyPrompt, EngineCore, PromptTooLong
from swakv.engine.llm import LLM
from swakv.sampling_params import SamplingParams
from swakv.sched.sizing import PoolSizes

WINDOW = 8
PAGE = 4
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from swakv.model.testing import make_tiny_gemma3_dir

    path = tmp_path_factory.mktemp("tiny")
    make_tiny_gemma3_dir(path, num_layers=4, window=WINDOW, vocab=128, seed=0)
    return str(path)


def sizes(full_pages: int, swa_pages: int, page: int = PAGE) -> PoolSizes:
    return PoolSizes(full_pages, swa_pages, page, 0, 0)


def engine(tiny_dir, full_pages=512, swa_pages=512, **cfg) -> EngineCore:
    settings = dict(page_size=PAGE, chunk_size=16, max_running_requests=32, frontier_stride=4,
                    decode_reserve=8)
    settings.update(cfg)
    return build_engine(tiny_dir, EngineConfig(**settings), sizes=sizes(full_pages, swa_pages))


def prompts(n: int, seed: int = 0, lo: int = 1, hi: int = 6 * WINDOW) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(3, 128, (n_,), generator=g).tolist() for n_ in lens]


def run_all(eng: EngineCore, reqs, max_steps: int = 10_000) -> int:
    steps = 0
    while any(not r.is_finished for r in reqs):
        eng.step()
        eng.check_integrity()
        steps += 1
        assert steps < max_steps, "engine made no progress"
    return steps


def generate(eng: EngineCore, batch: list[list[int]], params=GREEDY) -> list[list[int]]:
    reqs = [eng.add_request(p, params) for p in batch]
    run_all(eng, reqs)
    return [r.output_ids for r in reqs]


def assert_pools_full_after_flush(eng: EngineCore) -> None:
    eng.flush_cache()
    eng.check_integrity()
    assert eng.allocator.available() == eng.allocator.total()


def test_batched_equals_alone(tiny_dir):
    batch = prompts(16, seed=1)
    eng = engine(tiny_dir, enable_prefix_cache=False)
    alone = [generate(eng, [p])[0] for p in batch]
    together = generate(engine(tiny_dir), batch)
    assert together == alone
    assert all(len(o) == GREEDY.max_tokens for o in together)


def test_retraction_keeps_outputs(tiny_dir):
    batch = prompts(12, seed=2, lo=WINDOW, hi=4 * WINDOW)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    reference = generate(engine(tiny_dir), batch, params)
    tight = engine(tiny_dir, full_pages=40, swa_pages=40, decode_reserve=1)
    out = generate(tight, batch, params)
    assert tight.scheduler.counters.num_retractions > 0
    assert out == reference
    assert_pools_full_after_flush(tight)


def test_prefix_cache_hits_and_equal_outputs(tiny_dir):
    shared = prompts(1, seed=3, lo=5 * WINDOW, hi=5 * WINDOW + 1)[0]
    batch = [shared + tail for tail in prompts(4, seed=4, lo=1, hi=WINDOW)]
    eng = engine(tiny_dir)
    first = generate(eng, batch[:1])
    hits_before = eng.scheduler.counters.prefix_hit_tokens
    rest = generate(eng, batch[1:])
    assert eng.scheduler.counters.prefix_hit_tokens - hits_before >= 3 * (len(shared) // PAGE * PAGE - WINDOW)
    no_cache = engine(tiny_dir, enable_prefix_cache=False)
    assert first + rest == generate(no_cache, batch)
    assert_pools_full_after_flush(eng)


def test_prompt_too_long_rejected_at_submission(tiny_dir):
    eng = engine(tiny_dir, full_pages=10, swa_pages=20)
    with pytest.raises(PromptTooLong) as e:
        eng.add_request(list(range(3, 3 + 40)), GREEDY)
    assert "40" in str(e.value) and "full KV pool 40" in str(e.value)
    with pytest.raises(EmptyPrompt):
        eng.add_request([], GREEDY)
    with pytest.raises(ValueError):
        eng.add_request([1, 2, 10_000], GREEDY)
    assert not eng.has_unfinished()


def test_prompt_bigger_than_swa_pool_is_chunked(tiny_dir):
    # SWA pool: 10 pages = 40 tokens; prompt of 100 tokens still fits the full pool.
    eng = engine(tiny_dir, full_pages=64, swa_pages=10, chunk_size=64)
    batch = prompts(1, seed=5, lo=100, hi=101)
    out = generate(eng, batch)
    ref = generate(engine(tiny_dir), batch)
    assert out == ref
    assert eng.cost.chunk_size < 64
    assert_pools_full_after_flush(eng)


def test_stop_strings_and_tokens(tiny_dir):
    eng = engine(tiny_dir)
    batch = prompts(1, seed=6)
    base = generate(eng, batch, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    stop_id = base[5]
    first = base.index(stop_id)
    req = eng.add_request(batch[0], SamplingParams(temperature=0, max_tokens=12,
                                                   stop_token_ids=(stop_id,), ignore_eos=True))
    run_all(eng, [req])
    assert req.output_ids == base[: first + 1]
    assert req.finish_reason.value == "stop"


def test_abort_frees_kv(tiny_dir):
    eng = engine(tiny_dir, enable_prefix_cache=False)
    reqs = [eng.add_request(p, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
            for p in prompts(4, seed=7)]
    for _ in range(5):
        eng.step()
    for r in reqs:
        assert eng.abort(r.request_id)
    eng.check_integrity()
    assert eng.allocator.available() == eng.allocator.total()
    assert all(r.finish_reason.value == "abort" for r in reqs)


def test_llm_api_generate_chat_stream(tiny_dir):
    llm = LLM(tiny_dir, page_size=PAGE, kv_memory=64 << 20, chunk_size=16)
    outs = llm.generate(["hello world", "a b c"], SamplingParams(temperature=0, max_tokens=5,
                                                                 ignore_eos=True))
    assert [len(o.token_ids) for o in outs] == [5, 5]
    assert outs[0].usage.completion_tokens == 5 and outs[0].finish_reason == "length"
    chunks = list(llm.stream("hello world", SamplingParams(temperature=0, max_tokens=5,
                                                          ignore_eos=True)))
    assert [t for c in chunks for t in c.token_ids] == outs[0].token_ids
    assert "".join(c.delta_text for c in chunks) == outs[0].text
    assert chunks[-1].finished and chunks[-1].finish_reason == "length"
    chat = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(temperature=0, max_tokens=3))
    assert chat[0].usage.prompt_tokens > 1
    assert not llm.engine.has_unfinished()


def test_text_held_back_is_released_when_a_request_ends():
    # Byte-fallback pieces of an unfinished character are held back while streaming;
    # when the request ends (length or a stop token) the rest is flushed (U+FFFD for a
    # dangling byte), as decoding the ids does. Before, it was dropped.
    import tempfile

    from swakv.engine.output import OutputText
    from swakv.model.testing import make_tiny_gemma3_dir
    from swakv.model.tokenizer import Tokenizer
    from swakv.sched.request import FinishReason

    tok = Tokenizer.from_dir(make_tiny_gemma3_dir(tempfile.mkdtemp(), num_layers=1, vocab=400))
    half = tok.encode("é", add_bos=False)[:1]  # the first byte piece of a 2-byte character
    assert len(half) == 1
    for reason_token, params in ((half[0], SamplingParams(max_tokens=1)),
                                 (1, SamplingParams(max_tokens=5))):
        out = OutputText(tok, params, frozenset({1}))
        assert out.add_token(half[0], 1, params.max_tokens == 1) in (None, FinishReason.LENGTH)
        if params.max_tokens > 1:
            assert out.text == ""  # held back mid-character
            assert out.add_token(reason_token, 2, False) is FinishReason.STOP
        assert out.text == tok.decode(half) and out.text != ""


def test_off_the_main_thread_returns_and_raises() -> None:
    """The server loads its model on a thread that ends (see `off_the_main_thread`)."""
    import threading

    from swakv.engine.build import off_the_main_thread

    assert off_the_main_thread(lambda: threading.current_thread().name) == "swakv-load"

    def fail() -> None:
        raise ValueError("bad model")

    with pytest.raises(ValueError, match="bad model"):
        off_the_main_thread(fail)
