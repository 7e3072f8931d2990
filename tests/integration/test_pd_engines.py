"""Prefill and decode engines in one process (real control plane and Mooncake over
loopback, tiny Gemma 3): outputs equal the colocated engine, transfers move exactly
the planned bytes, the decode side preallocates with two budgets, retraction goes
through host copies, and faults free every page on both sides."""

from __future__ import annotations

import pytest
import torch
from pd_harness import PAGE, WINDOW, Pair, core, flushed_at_baseline, make_prefill

from swakv.memory.pages import page_floor, swa_tail_len
from swakv.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from swakv.model.testing import make_tiny_gemma3_dir

    path = tmp_path_factory.mktemp("tiny-pd")
    make_tiny_gemma3_dir(path, num_layers=4, window=WINDOW, vocab=128, seed=3)
    return str(path)


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (n,), generator=g).tolist() for n in lengths]


def reference(tiny_dir, batch, params=GREEDY):
    eng = core(tiny_dir, 1024, 1024)
    reqs = [eng.add_request(p, params) for p in batch]
    while any(not r.is_finished for r in reqs):
        eng.step()
    return [r.output_ids for r in reqs]


@pytest.fixture
def pair_factory():
    made = []

    def make(p_core, d_core, cfg=None):
        pair = Pair.build(p_core, d_core, cfg)
        made.append(pair)
        return pair

    yield make
    for pair in made:
        pair.close()


def test_outputs_equal_colocated_and_bytes_are_exact(tiny_dir, pair_factory):
    batch = prompts([5, 37, 100, 3 * WINDOW + 1])
    want = reference(tiny_dir, batch)
    pair = pair_factory(core(tiny_dir, 512, 256), core(tiny_dir, 512, 256))
    reqs = [pair.submit(p, GREEDY, f"r{i}") for i, p in enumerate(batch)]
    pair.run(reqs)
    assert [pair.tokens(r.request_id) for r in reqs] == want
    bpt = pair.decode.bytes_per_token()
    sent = pair.prefill.backend.stats()
    assert sent.pool_bytes("full") == sum(len(p) for p in batch) * bpt.full
    assert sent.pool_bytes("swa") == sum(swa_tail_len(len(p), WINDOW, PAGE)
                                         for p in batch) * bpt.swa
    assert pair.decode.stats.bytes_received.full == sent.pool_bytes("full")
    assert flushed_at_baseline(pair.decode.core) and flushed_at_baseline(pair.prefill.core)


def handshake(pair: Pair) -> None:
    """Connect the decode side to the prefill side and wait for the Bootstrap answer."""
    pair.decode._ensure_peer(pair.address)
    for _ in range(2000):
        pair.step()
        if pair.decode.peers[pair.address].ready:
            return
    raise AssertionError("no Bootstrap answer")


def preallocated_at_once(tiny_dir, pair_factory, tail: bool, num_requests: int,
                         length: int) -> tuple[int, Pair, list]:
    from swakv.disagg.config import PDConfig

    cfg = PDConfig(role="decode", pd_heartbeat_interval=0.2, pd_peer_timeout=2.0,
                   pd_swa_tail_prealloc=tail)
    # decode SWA pool: K = 8 steady windows (cost model: page_ceil(W + page + stride) = 16)
    pair = pair_factory(core(tiny_dir, 1024, 256), core(tiny_dir, 1024, 8 * 16 // PAGE), cfg)
    handshake(pair)
    batch = prompts([length] * num_requests, seed=7)
    reqs = [pair.submit(p, GREEDY, f"k{i}") for i, p in enumerate(batch)]
    pair.decode.step()  # one preallocation pass; the prefill side has not run yet
    pair.decode.check_integrity()
    return len(pair.decode.inflight), pair, list(zip(reqs, batch))


def test_swa_tail_preallocation_admits_k_long_requests_at_once(tiny_dir, pair_factory):
    """Acceptance 4: SWA pool of K = 8 windows, 10 requests of 8 windows each."""
    k, length = 8, 8 * WINDOW
    with_tail, pair, work = preallocated_at_once(tiny_dir, pair_factory, True, k + 2, length)
    budget = pair.decode.stats.budget
    pair.run([r for r, _ in work])
    assert [pair.tokens(r.request_id) for r, _ in work] == reference(tiny_dir, [p for _, p in work])
    without, pair2, work2 = preallocated_at_once(tiny_dir, pair_factory, False, k + 2, length)
    pair2.run([r for r, _ in work2])
    assert [pair2.tokens(r.request_id) for r, _ in work2] == reference(
        tiny_dir, [p for _, p in work2])
    print(f"\npreallocated at once: {with_tail} with SWA tail preallocation, {without} "
          f"without (SWA pool {k} windows, prompts of {length} tokens)")
    assert with_tail == k and budget.swa < 16  # the K+1-th waits for the SWA budget
    assert without == (k * 16) // length  # SWA for whole prompts: 2 fit
    assert flushed_at_baseline(pair.decode.core) and flushed_at_baseline(pair2.decode.core)


def test_decode_retraction_restores_from_host_copies(tiny_dir, pair_factory):
    """Acceptance 5: a small decode full pool forces retraction; outputs unchanged."""
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    batch = prompts([40, 37, 44, 41, 39, 42], seed=11)
    want = reference(tiny_dir, batch, params)
    pair = pair_factory(core(tiny_dir, 512, 256), core(tiny_dir, 60, 64, decode_reserve=4))
    reqs = [pair.submit(p, params, f"x{i}") for i, p in enumerate(batch)]
    pair.run(reqs)
    assert [pair.tokens(r.request_id) for r in reqs] == want
    d = pair.decode
    assert d.scheduler.num_host_copies > 0 and d.num_restores == d.scheduler.num_host_copies
    assert d.core.scheduler.counters.num_retractions == d.scheduler.num_host_copies
    assert flushed_at_baseline(d.core) and flushed_at_baseline(pair.prefill.core)


def test_second_turn_moves_only_new_tokens(tiny_dir, pair_factory):
    """Acceptance 6 (in process): the decode side's own cache holds turn 1."""
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    first, extra = prompts([50, 20], seed=5)
    pair = pair_factory(core(tiny_dir, 512, 256), core(tiny_dir, 512, 256))
    r1 = pair.submit(first, params, "turn1")
    pair.run([r1])
    second = first + pair.tokens("turn1") + extra
    before = pair.prefill.backend.stats()
    r2 = pair.submit(second, params, "turn2")
    pair.run([r2])
    after = pair.prefill.backend.stats()
    hit = page_floor(len(first) + 10 - 1, PAGE)  # turn 1's committed KV
    assert r2.cached_prompt_tokens == hit
    bpt = pair.decode.bytes_per_token()
    n = len(second)
    assert after.pool_bytes("full") - before.pool_bytes("full") == (n - hit) * bpt.full
    swa_start = page_floor(max(hit, n - WINDOW), PAGE)
    assert after.pool_bytes("swa") - before.pool_bytes("swa") == (n - swa_start) * bpt.swa
    assert pair.tokens("turn2") == reference(tiny_dir, [second], params)[0]


def test_prefill_admits_prompts_longer_than_its_swa_pool(tiny_dir, pair_factory):
    """Acceptance 3: the prefill worker's SWA pool holds 64 tokens, the prompt 300."""
    batch = prompts([300], seed=9)
    pair = pair_factory(core(tiny_dir, 512, 16), core(tiny_dir, 512, 256))
    assert pair.prefill.core.allocator.total().swa < 300
    reqs = [pair.submit(batch[0], GREEDY, "long")]
    pair.run(reqs)
    assert pair.tokens("long") == reference(tiny_dir, batch)[0]


def step_until(pair: Pair, predicate, timeout: float = 30.0, sides=("decode", "prefill")):
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        for side in sides:
            eng = getattr(pair, side)
            for out in eng.step():
                pair.outputs.setdefault(out.request.request_id, []).append(out)
            eng.check_integrity()


def test_dead_prefill_worker_fails_requests_and_frees_decode_pages(tiny_dir, pair_factory):
    import time

    from swakv.disagg.worker import UnavailableOutput

    pair = pair_factory(core(tiny_dir, 512, 256), core(tiny_dir, 512, 256))
    handshake(pair)
    d = pair.decode
    total = d.core.allocator.total()
    reqs = [pair.submit(p, GREEDY, f"f{i}") for i, p in enumerate(prompts([60, 90], seed=2))]
    d.step()
    assert len(d.inflight) == 2 and d.core.allocator.available() != total
    t0 = time.monotonic()
    pair.prefill.close()  # its control socket closes like a killed process's
    step_until(pair, lambda: all(pair.done(r.request_id) for r in reqs), sides=("decode",))
    assert time.monotonic() - t0 < 5
    for r in reqs:
        (out,) = pair.outputs[r.request_id]
        assert isinstance(out, UnavailableOutput) and "unavailable" in out.error
    assert d.core.allocator.available() == total and not d.inflight
    assert pair.address not in d.peers
    # a new prefill worker: requests succeed again
    pair.prefill = make_prefill(core(tiny_dir, 512, 256))
    batch = prompts([33], seed=4)
    r = pair.submit(batch[0], GREEDY, "after")
    pair.run([r])
    assert pair.tokens("after") == reference(tiny_dir, batch)[0]
    assert d.core.allocator.available() != total  # its KV is cached on the decode side
    assert flushed_at_baseline(d.core)


@pytest.mark.parametrize("when", ["computing", "writing"])
def test_dead_decode_worker_frees_prefill_pages(tiny_dir, pair_factory, when):
    import time

    pair = pair_factory(core(tiny_dir, 512, 256), core(tiny_dir, 512, 256))
    p = pair.prefill
    handshake(pair)
    pair.submit(prompts([300], seed=6)[0], GREEDY, "orphan")
    pair.decode.step()  # Prealloc sent
    if when == "writing":
        step_until(pair, lambda: bool(p.jobs), sides=("prefill",))
    pair.decode.close()  # silent from now on
    if when == "computing":  # the prefill side hears of the Prealloc and the loss together
        time.sleep(2.5)
        p.step()
        assert not p.jobs and p.num_ok == p.num_failed == 0
    # a write fails at once (connection refused); the peer is dropped after 2 s of silence
    step_until(pair, lambda: not p.jobs and not p.decoders, timeout=10, sides=("prefill",))
    assert not p.scheduler.held
    assert flushed_at_baseline(p.core)


def test_client_abort_while_kv_in_flight(tiny_dir, pair_factory):
    pair = pair_factory(core(tiny_dir, 512, 256), core(tiny_dir, 512, 256))
    handshake(pair)
    d = pair.decode
    pair.submit(prompts([120], seed=8)[0], GREEDY, "gone")
    d.step()
    assert "gone" in d.inflight
    assert d.abort("gone")
    assert "gone" in d.inflight and d.inflight["gone"].abandoned  # pages wait for the answer
    step_until(pair, lambda: not d.inflight and not pair.prefill.jobs)
    assert d.core.requests["gone"].finish_reason.value == "abort" if "gone" in \
        d.core.requests else True
    assert "gone" not in d.core.requests  # settled: aborted and released once the KV landed
    assert flushed_at_baseline(d.core) and flushed_at_baseline(pair.prefill.core)


def test_kv_timeout_answers_503_and_frees_after_the_peer_answers(tiny_dir, pair_factory):
    import time

    from swakv.disagg.config import PDConfig
    from swakv.disagg.worker import UnavailableOutput

    cfg = PDConfig(role="decode", pd_heartbeat_interval=0.2, pd_peer_timeout=5.0,
                   pd_kv_timeout=0.3)
    pair = pair_factory(core(tiny_dir, 512, 256), core(tiny_dir, 512, 256), cfg)
    handshake(pair)
    d = pair.decode
    pair.submit(prompts([50], seed=1)[0], GREEDY, "slow")
    d.step()
    time.sleep(0.4)
    step_until(pair, lambda: pair.done("slow"), sides=("decode",))
    (out,) = pair.outputs["slow"]
    assert isinstance(out, UnavailableOutput) and "no KV" in out.error
    assert d.inflight["slow"].abandoned
    step_until(pair, lambda: not d.inflight)
    assert "slow" not in d.core.requests
    assert flushed_at_baseline(d.core) and flushed_at_baseline(pair.prefill.core)


def test_one_decode_worker_with_two_prefill_workers(tiny_dir, pair_factory):
    from swakv.disagg.decode_worker import RoutedPrompt

    pair = pair_factory(core(tiny_dir, 512, 256), core(tiny_dir, 512, 256))
    second = make_prefill(core(tiny_dir, 512, 256))
    try:
        batch = prompts([41, 66, 23, 90], seed=12)
        addresses = [pair.address, second.control.address]
        reqs = [pair.decode.add_request(RoutedPrompt(p, addresses[i % 2]), GREEDY, f"m{i}")
                for i, p in enumerate(batch)]
        while not all(pair.done(r.request_id) for r in reqs):
            pair.step()
            second.step()
            second.check_integrity()
        assert [pair.tokens(r.request_id) for r in reqs] == reference(tiny_dir, batch)
        bpt = pair.decode.bytes_per_token()
        for eng, lengths in ((pair.prefill, (41, 23)), (second, (66, 90))):
            assert eng.backend.stats().pool_bytes("full") == sum(lengths) * bpt.full
            assert flushed_at_baseline(eng.core)
        assert sum(p.ready for p in pair.decode.peers.values()) == 2
    finally:
        second.close()
