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


def test_f02_unexpected_add_error_answers_500_and_engine_lives(core):
    real = core.add_request
    calls = [0]

    def flaky(*a, **kw):
        calls[0] += 1
        if calls[0] == 1:
            raise KeyError("not a ValueError")
        return real(*a, **kw)

    core.add_request = flaky
    eng = AsyncEngine(core)
    eng.start()

    async def scenario():
        with pytest.raises(RequestFailed, match="not a ValueError"):
            await generate(eng, "a")
        assert eng.healthy
        return await generate(eng, "b")

    try:
        assert len(run(scenario())) == 3
    finally:
        eng.stop()


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
    real = core.runner.forward
    calls = [0]

    def forward(items, *a, **kw):
        calls[0] += 1
        if calls[0] == 2:
            raise RuntimeError("injected")
        return real(items, *a, **kw)

    core.runner.forward = forward
    eng = AsyncEngine(core)
    eng.start()

    async def scenario():
        with pytest.raises(RequestFailed, match="injected"):
            await generate(eng, "a")
        assert eng.healthy
        return await generate(eng, "b")

    try:
        assert len(run(scenario())) == 3
    finally:
        eng.stop()
