"""The HTTP layer and the engine thread in-process (FastAPI TestClient) over a real
EngineCore on the tiny random Gemma 3: SSE shape, n > 1, usage, engine rejections,
aborts, metrics, the thread contract, and a failing step."""

from __future__ import annotations

import json
import threading
import time

import pytest
from fastapi.testclient import TestClient

from swakv.config import EngineConfig, ServerConfig
from swakv.engine.build import build_engine
from swakv.engine.llm import LLM
from swakv.sampling_params import SamplingParams
from swakv.sched.sizing import PoolSizes
from swakv.server.app import create_app
from swakv.server.async_engine import AsyncEngine
from swakv.server.metrics import ServerMetrics

FULL_PAGES = 64  # page 4: a 256-token full pool, so long prompts are rejected


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from swakv.model.testing import make_tiny_gemma3_dir

    path = tmp_path_factory.mktemp("tiny_server_app")
    make_tiny_gemma3_dir(path, num_layers=3, window=8, vocab=128, seed=3)
    return str(path)


@pytest.fixture
def core(tiny_dir):
    cfg = EngineConfig(page_size=4, chunk_size=32, max_running_requests=8)
    eng = build_engine(tiny_dir, cfg, sizes=PoolSizes(FULL_PAGES, 64, 4, 0, 0))
    eng.threads = set()
    for name in ("step", "add_request", "abort"):
        real = getattr(eng, name)

        def traced(*a, _real=real, **kw):
            eng.threads.add(threading.current_thread().name)
            return _real(*a, **kw)

        setattr(eng, name, traced)
    return eng


def make_client(core) -> TestClient:
    holder: list[AsyncEngine] = []
    metrics = ServerMetrics(lambda: holder[0].snapshot)
    engine = AsyncEngine(core, metrics)
    holder.append(engine)
    return TestClient(create_app(ServerConfig(served_model_name="tiny"), engine, metrics))


@pytest.fixture
def client(core):
    with make_client(core) as c:
        yield c


def test_completion_and_usage(client, core, tiny_dir):
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "hey", "max_tokens": 5,
                                             "n": 2, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    body = r.json()
    texts = [c["text"] for c in body["choices"]]
    prompt_tokens = len(core.tokenizer.encode("hey"))
    assert body["usage"]["prompt_tokens"] == prompt_tokens
    assert body["usage"]["completion_tokens"] == 10
    assert body["usage"]["total_tokens"] == prompt_tokens + 10
    assert texts[0] == texts[1]  # greedy twice
    assert core.threads == {"swakv-engine"}  # only the engine thread touched the engine
    assert core.requests == {}  # released
    ref = LLM(tiny_dir, page_size=4, kv_memory=16 << 20).generate(
        "hey", SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
    assert texts[0] == ref.text


def test_chat_stream_shape(client):
    with client.stream("POST", "/v1/chat/completions", json={
            "model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_engine_rejections_are_400(client, core):
    prompt = [10 + i % 100 for i in range(300)]  # 300 tokens > 256-token full pool
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": prompt})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded"
    assert "300 tokens" in err["message"] and "full KV pool 256 tokens" in err["message"]
    assert client.get("/health").status_code == 200


def test_abort_frees_and_counts(core):
    with make_client(core) as c:
        with c.stream("POST", "/v1/completions", json={
                "model": "tiny", "prompt": "a", "max_tokens": 200, "ignore_eos": True,
                "stream": True}) as r:
            it = r.iter_lines()
            next(it)
        deadline = time.monotonic() + 2
        while c.get("/metrics").text.count('state="requests"} 0.0') < 2:
            assert time.monotonic() < deadline, "KV of the aborted request not freed"
            time.sleep(0.02)
        assert core.metrics.num_aborted == 1


def test_metrics_exposition(client):
    from prometheus_client.parser import text_string_to_metric_families

    client.post("/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 2})
    text = client.get("/metrics").text
    names = {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}
    assert {"swakv_kv_pool_tokens", "swakv_retractions_total",
            "swakv_request_latency_seconds_count", "swakv_http_requests_total"} <= names


def test_engine_failure_marks_unhealthy(core):
    def boom():
        raise RuntimeError("kaput")

    core.step = boom  # fault injection: the engine's step raises
    with make_client(core) as c:
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": "a"})
        assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"
        assert c.get("/health").status_code == 503
