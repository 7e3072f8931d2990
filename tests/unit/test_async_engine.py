"""Finding 2 of issue 13: the engine thread never dies silently and every command it
reads is answered. Real EngineCore on the tiny model, driven through AsyncEngine."""

from __future__ import annotations

import asyncio

import pytest

from swakv.config import EngineConfig
from swakv.engine.build import build_engine
from swakv.sampling_params import SamplingParams
from swakv.sched.sizing import PoolSizes
from swakv.server.async_engine import (
    _STOP,
    AsyncEngine,
    EngineUnavailable,
    RequestFailed,
    _Sink,
)

PARAMS = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from swakv.model.testing import make_tiny_gemma3_dir

    path = tmp_path_factory.mktemp("tiny_async")
    make_tiny_gemma3_dir(path, num_layers=3, window=8, vocab=128, seed=2)
    return str(path)


@pytest.fixture
def core(tiny_dir):
    cfg = EngineConfig(page_size=4, chunk_size=32, max_running_requests=8)
    return build_engine(tiny_dir, cfg, sizes=PoolSizes(64, 64, 4, 0, 0))


async def generate(eng: AsyncEngine, rid: str, prompt=(5, 6, 7)) -> list[int]:
    group = eng.submit(rid, [(list(prompt), PARAMS)])
    await group.wait_accepted()
    tokens = []
    async for d in group.events():
        tokens += d.token_ids
    return tokens


def run(coro, timeout: float = 20.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def fail_on_call(real, call: int, error: BaseException):
    """`real`, except that its `call`-th call (counting from 1) raises `error`."""
    calls = [0]

    def wrapper(*a, **kw):
        calls[0] += 1
        if calls[0] == call:
            raise error
        return real(*a, **kw)

    return wrapper


def assert_first_fails_then_engine_serves(core, match: str) -> None:
    """Request "a" fails with RequestFailed(`match`); the engine stays healthy and
    request "b" then generates all its tokens."""
    eng = AsyncEngine(core)
    eng.start()

    async def scenario():
        with pytest.raises(RequestFailed, match=match):
            await generate(eng, "a")
        assert eng.healthy
        return await generate(eng, "b")

    try:
        assert len(run(scenario())) == 3
    finally:
        eng.stop()


def test_f02_unexpected_add_error_answers_500_and_engine_lives(core):
    core.add_request = fail_on_call(core.add_request, 1, KeyError("not a ValueError"))
    assert_first_fails_then_engine_serves(core, "not a ValueError")


def test_f02_snapshot_error_keeps_the_engine_running(core):
    eng = AsyncEngine(core)
    good = eng.snapshot
    core.snapshot = lambda: (_ for _ in ()).throw(RuntimeError("metrics broke"))
    eng.start()
    try:
        assert len(run(generate(eng, "a"))) == 3
        assert eng.healthy and eng.snapshot is good  # the last good one is kept
    finally:
        eng.stop()


def test_f02_add_in_the_same_batch_as_stop_is_answered(core):
    # Queue an add and the stop before the thread reads anything: both arrive in one
    # batch. Before, the add was dropped and its caller waited forever.
    eng = AsyncEngine(core)

    async def scenario():
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        eng._cmds.put(("add", [("x-0", [5, 6], PARAMS, _Sink(loop, q, 0))]))
        eng._cmds.put(_STOP)
        eng.start()
        return await q.get()

    ev = run(scenario())
    assert isinstance(ev.error, EngineUnavailable) and "shutting down" in str(ev.error)
    eng.stop()


def test_f02_submit_after_stop_is_refused_not_lost(core):
    eng = AsyncEngine(core)
    eng.start()
    eng.stop()

    async def scenario():
        with pytest.raises(EngineUnavailable):
            eng.submit("late", [([5, 6], PARAMS)])

    run(scenario())


def test_f02_thread_death_fails_every_waiter(core):
    # Anything escaping the contained step (here has_unfinished) fails live requests
    # and later adds at once instead of leaving them waiting.
    eng = AsyncEngine(core)
    real = core.has_unfinished
    state = {"armed": False}

    def has_unfinished():
        if state["armed"]:
            raise RuntimeError("thread bug")
        return real()

    core.has_unfinished = has_unfinished
    eng.start()

    async def scenario():
        group = eng.submit("a", [([5, 6, 7], SamplingParams(max_tokens=500, ignore_eos=True))])
        await group.wait_accepted()
        state["armed"] = True
        with pytest.raises(EngineUnavailable):
            async for _ in group.events():
                pass
        assert not eng.healthy
        with pytest.raises(EngineUnavailable):
            eng.submit("b", [([5], PARAMS)])

    run(scenario())
    eng.stop()


def test_f03_failed_step_answers_its_requests_with_request_failed(core):
    core.runner.forward = fail_on_call(core.runner.forward, 2, RuntimeError("injected"))
    assert_first_fails_then_engine_serves(core, "injected")


def test_snapshot_skips_plain_decode_steps_but_shows_every_state_change(core):
    # The snapshot is rebuilt when a request is added, gets its first token or
    # finishes (before that event is delivered), and at most every
    # SNAPSHOT_MAX_AGE_S otherwise: a 40-token decode does not rebuild it 40 times.
    real, calls = core.snapshot, [0]

    def counting():
        calls[0] += 1
        return real()

    core.snapshot = counting
    eng = AsyncEngine(core)
    calls[0] = 0
    steps_before = core.metrics.num_steps
    long = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    eng.start()

    async def scenario():
        group = eng.submit("a", [([5, 6, 7], long)])
        await group.wait_accepted()
        assert eng.snapshot.num_waiting + eng.snapshot.num_running == 1
        num_tokens = 0
        async for d in group.events():
            if num_tokens == 0:  # first token: the snapshot already shows it running
                assert eng.snapshot.num_running == 1
                assert eng.snapshot.counters["scheduled_tokens"] >= 3  # the prefill
            num_tokens += len(d.token_ids)
        # the finish was delivered after the snapshot that shows it
        assert eng.snapshot.num_running == 0 and eng.snapshot.num_waiting == 0
        assert eng.snapshot.counters["finished"] >= 1
        assert eng.snapshot.counters["output_tokens"] >= 40
        return num_tokens

    try:
        assert run(scenario()) == 40
    finally:
        eng.stop()
    num_steps = core.metrics.num_steps - steps_before
    assert num_steps >= 40
    assert calls[0] < num_steps // 2, (calls[0], num_steps)
