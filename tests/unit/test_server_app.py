"""The HTTP layer and the engine thread over a fake EngineCore (no model): SSE shape,
n > 1, usage, errors from the engine, aborts, metrics, and the thread contract."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import pytest
from fastapi.testclient import TestClient

from swakv.config import ServerConfig
from swakv.engine.core import EmptyPrompt, PromptTooLong, StepOutput
from swakv.engine.metrics import EngineMetrics
from swakv.memory.pages import Need
from swakv.sched.request import FinishReason, Lifecycle, Request
from swakv.sched.scheduler import SchedulerCounters
from swakv.server.app import create_app
from swakv.server.async_engine import AsyncEngine
from swakv.server.metrics import ServerMetrics

MAX_CONTEXT = 64
OUT = "abcdefghijklmnopqrstuvwxyz"


class FakeTokenizer:
    special_tokens = {"bos_token": "^"}
    eos_ids = ()

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        return ([2] if add_bos else []) + [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids if i >= 32)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        return "^" + "|".join(m["content"] for m in messages) + ">"


@dataclass
class FakeStats:
    cached: Need = Need(0, 0)
    evictable: Need = Need(0, 0)


@dataclass
class FakeScheduler:
    waiting: list = field(default_factory=list)
    running: list = field(default_factory=list)
    counters: SchedulerCounters = field(default_factory=SchedulerCounters)


class FakeEngine:
    """Outputs OUT[i] as token i; every running request uses 4 'full' and 2 'swa' tokens."""

    def __init__(self, step_delay: float = 0.0) -> None:
        self.spec = type("Spec", (), {"vocab_size": 1000})()
        self.max_context, self.tokenizer = MAX_CONTEXT, FakeTokenizer()
        self.sampler = object()
        self.metrics, self.scheduler = EngineMetrics(), FakeScheduler()
        self.cache = type("Cache", (), {"stats": lambda _self: FakeStats()})()
        self.allocator = self
        self.requests: dict[str, Request] = {}
        self.step_delay = step_delay
        self.threads: set[str] = set()

    def total(self) -> Need:
        return Need(1000, 100)

    def available(self) -> Need:
        n = len(self.scheduler.running)
        return Need(1000 - 4 * n, 100 - 2 * n)

    def add_request(self, prompt_ids, params, request_id=None) -> Request:
        self.threads.add(threading.current_thread().name)
        if not prompt_ids:
            raise EmptyPrompt("prompt must contain at least one token")
        if len(prompt_ids) >= MAX_CONTEXT:
            raise PromptTooLong(len(prompt_ids), MAX_CONTEXT, MAX_CONTEXT, 5000)
        req = Request(list(prompt_ids), params, MAX_CONTEXT, request_id=request_id,
                      arrival_time=time.monotonic())
        assert request_id is not None
        req.lifecycle = Lifecycle.RUNNING
        self.requests[request_id] = req
        self.scheduler.running.append(req)
        return req

    def has_unfinished(self) -> bool:
        return bool(self.scheduler.running)

    def _finish(self, req: Request, reason: FinishReason) -> None:
        req.lifecycle, req.finish_reason, req.finish_time = (
            Lifecycle.FINISHED, reason, time.monotonic())
        self.scheduler.running.remove(req)
        self.metrics.on_finish(req)

    def abort(self, request_id: str) -> bool:
        req = self.requests.get(request_id)
        if req is None or req.is_finished:
            return False
        self._finish(req, FinishReason.ABORT)
        return True

    def release(self, request_id: str) -> None:
        self.requests.pop(request_id, None)

    def step(self) -> list[StepOutput]:
        self.threads.add(threading.current_thread().name)
        time.sleep(self.step_delay)
        outs = []
        for req in list(self.scheduler.running):
            i = req.num_output_tokens
            req.token_ids.append(ord(OUT[i % len(OUT)]))
            req.first_token_time = req.first_token_time or time.monotonic()
            done = req.max_new_tokens == 0
            if done:
                self._finish(req, FinishReason.LENGTH)
            outs.append(StepOutput(req, [req.token_ids[-1]], OUT[i % len(OUT)], done))
        self.metrics.on_step(len(outs), len(outs), self.step_delay)
        return outs


def make_client(fake: FakeEngine, **cfg) -> TestClient:
    holder: list[AsyncEngine] = []
    metrics = ServerMetrics(lambda: holder[0].snapshot)
    engine = AsyncEngine(fake, metrics)
    holder.append(engine)
    return TestClient(create_app(ServerConfig(served_model_name="fake", **cfg), engine, metrics))


@pytest.fixture
def fake():
    return FakeEngine()


@pytest.fixture
def client(fake):
    with make_client(fake) as c:
        yield c


def test_completion_and_usage(client, fake):
    r = client.post("/v1/completions", json={"model": "fake", "prompt": "hey", "max_tokens": 5,
                                             "n": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["text"] for c in body["choices"]] == ["abcde", "abcde"]
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 10, "total_tokens": 14,
                             "prompt_tokens_details": {"cached_tokens": 0}}
    assert fake.threads == {"swakv-engine"}  # only the engine thread touched the engine
    assert fake.requests == {}  # released


def test_chat_stream_shape(client):
    lines = []
    with client.stream("POST", "/v1/chat/completions", json={
            "model": "fake", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3,
            "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    import json

    chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]) == "abc"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_engine_rejections_are_400(client):
    r = client.post("/v1/completions", json={"model": "fake", "prompt": "x" * 100})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "context_length_exceeded"
    assert "101 tokens" in r.json()["error"]["message"]


def test_abort_frees_and_counts(fake):
    fake.step_delay = 0.01
    with make_client(fake) as c:
        with c.stream("POST", "/v1/completions", json={
                "model": "fake", "prompt": "a", "max_tokens": 60, "stream": True}) as r:
            it = r.iter_lines()
            next(it)
        deadline = time.monotonic() + 2
        while fake.scheduler.running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not fake.scheduler.running
        assert fake.metrics.num_aborted == 1 and fake.requests == {}


def test_metrics_exposition(client):
    from prometheus_client.parser import text_string_to_metric_families

    client.post("/v1/completions", json={"model": "fake", "prompt": "a", "max_tokens": 2})
    text = client.get("/metrics").text
    names = {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}
    assert {"swakv_kv_pool_tokens", "swakv_retractions_total",
            "swakv_request_latency_seconds_count", "swakv_http_requests_total"} <= names


def test_engine_failure_marks_unhealthy(fake):
    def boom():
        raise RuntimeError("kaput")

    fake.step = boom
    with make_client(fake) as c:
        r = c.post("/v1/completions", json={"model": "fake", "prompt": "a"})
        assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"
        assert c.get("/health").status_code == 503
