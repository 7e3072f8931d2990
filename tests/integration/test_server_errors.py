"""Bad input gets its documented status and an OpenAI error body, never a 500; the
server stays healthy and leaks no KV. Runs the real server with an API key."""

from __future__ import annotations

import httpx
import pytest

from swakv.server.testing import ServerProcess, pool, scrape

KEY = "sk-test-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_CONTEXT = 256
MAX_BYTES = 4096
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
TEXT = {"model": "tiny", "prompt": "hi", "max_tokens": 2}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from swakv.model.testing import make_tiny_gemma3_dir

    path = make_tiny_gemma3_dir(tmp_path_factory.mktemp("tiny-errors"), num_layers=3,
                                window=8, vocab=128)
    with ServerProcess.start([
            "--model", str(path), "--served-model-name", "tiny", "--api-key", KEY,
            "--page-size", "4", "--kv-memory", "4MiB", "--max-context", str(MAX_CONTEXT),
            "--max-request-bytes", str(MAX_BYTES), "--max-n", "4", "--num-threads", "1"]) as proc:
        yield proc


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as c:
        yield c


def assert_error(resp: httpx.Response, status: int, code: str | None = None,
                 param: str | None = None, contains: str = "") -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert err["type"] == "invalid_request_error"
    if code is not None:
        assert err["code"] == code
    if param is not None:
        assert err["param"] == param
    assert contains in err["message"]
    return err


def chat(**overrides) -> dict:
    return {**CHAT, **overrides}


def text(**overrides) -> dict:
    return {**TEXT, **overrides}


BAD_PARAMS = [  # (endpoint, body, param)
    ("chat", chat(temperature=-1), "temperature"),
    ("chat", chat(top_p=0), "top_p"),
    ("chat", chat(top_p=1.5), "top_p"),
    ("chat", chat(min_p=2), "min_p"),
    ("chat", chat(top_k=-5), "top_k"),
    ("chat", chat(frequency_penalty=3), "frequency_penalty"),
    ("chat", chat(presence_penalty=-3), "presence_penalty"),
    ("chat", chat(repetition_penalty=0), "repetition_penalty"),
    ("chat", chat(max_tokens=0), "max_tokens"),
    ("chat", chat(max_completion_tokens=-1), "max_tokens"),
    ("chat", chat(min_tokens=5, max_tokens=2), "min_tokens"),
    ("chat", chat(n=0), "n"),
    ("chat", chat(n=5), "n"),
    ("chat", chat(seed=-1), "seed"),
    ("chat", chat(temperature="hot"), "temperature"),
    ("chat", chat(stop=""), "stop"),
    ("chat", chat(stop=["ok", ""]), "stop"),
    ("chat", chat(logit_bias={"5": 1}), "logit_bias"),
    ("chat", chat(tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
    ("chat", chat(response_format={"type": "json_object"}), "response_format"),
    ("chat", chat(top_logprobs=2), "top_logprobs"),
    ("chat", chat(top_logprobs=50, logprobs=True), "top_logprobs"),
    ("chat", chat(stream_options={"include_usage": True}), "stream_options"),
    ("chat", chat(messages=[]), "messages"),
    ("chat", chat(messages=[{"role": "robot", "content": "x"}]), "messages.0.role"),
    ("chat", chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]),
     "messages.0.content"),
    ("chat", {"messages": CHAT["messages"]}, "model"),
    ("text", {"model": "tiny"}, "prompt"),
    ("text", text(prompt=[]), "prompt"),
    ("text", text(prompt=[1, 2, 100000]), "prompt"),
    ("text", text(prompt=[-1]), "prompt"),
    ("text", text(echo=True), "echo"),
    ("text", text(logprobs=99), "logprobs"),
    ("text", text(best_of=3), "best_of"),
]


@pytest.mark.parametrize("endpoint,body,param", BAD_PARAMS)
def test_bad_parameters_are_400(http, endpoint, body, param):
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    for stream in (False, True) if "stream_options" not in body else (False,):
        assert_error(http.post(path, json={**body, "stream": stream}), 400, param=param)


def test_malformed_json_and_non_object(http):
    for raw in (b"{not json", b"", b'"just a string"', b"[1, 2]", b"\xff\xfe"):
        resp = http.post("/v1/chat/completions", content=raw,
                         headers={"Content-Type": "application/json"})
        assert_error(resp, 400)


def test_unknown_model_is_404(http):
    assert_error(http.post("/v1/chat/completions", json=chat(model="gpt-9")), 404,
                 "model_not_found", "model", "gpt-9")
    assert_error(http.get("/v1/models/gpt-9"), 404, "model_not_found")
    assert http.get("/v1/models/tiny").json()["id"] == "tiny"


def test_prompt_longer_than_context_gives_both_numbers(http):
    long_prompt = "ab " * 200  # ~400 tokens > 256
    err = assert_error(http.post("/v1/completions", json=text(prompt=long_prompt)), 400,
                       "context_length_exceeded", "prompt")
    assert str(MAX_CONTEXT - 1) in err["message"]
    n_tokens = int(err["message"].split()[2])
    assert n_tokens > MAX_CONTEXT
    ids = list(range(10, 110)) * 3
    err = assert_error(http.post("/v1/completions", json=text(prompt=ids, stream=True)), 400,
                       "context_length_exceeded")
    assert "300" in err["message"] and str(MAX_CONTEXT - 1) in err["message"]
    err = assert_error(http.post("/v1/completions", json=text(max_tokens=MAX_CONTEXT)), 400,
                       "context_length_exceeded", "max_tokens")
    assert str(MAX_CONTEXT) in err["message"]


def test_body_too_large_is_413(http):
    big = text(prompt="x" * (MAX_BYTES + 10))
    assert_error(http.post("/v1/completions", json=big), 413, "request_too_large")

    def chunked():  # no Content-Length: the limit is enforced while reading
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}'

    assert_error(http.post("/v1/completions", content=chunked()), 413, "request_too_large")


def test_api_key_required(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models")):
            resp = httpx.request(method, server.url + path, json=CHAT, headers=headers)
            assert_error(resp, 401, "invalid_api_key")
    assert httpx.get(server.url + "/health").status_code == 200  # open
    assert httpx.get(server.url + "/metrics").status_code == 200


def test_unknown_route_and_method(http):
    assert_error(http.get("/v1/nothing"), 404)
    assert_error(http.get("/v1/chat/completions"), 405)


def test_healthy_and_no_kv_leaked_afterwards(http, server):
    ok = http.post("/v1/chat/completions", json=chat())
    assert ok.status_code == 200, ok.text
    assert ok.json()["choices"][0]["message"]["role"] == "assistant"
    assert http.get("/health").json() == {"status": "ok"}
    m = scrape(server.url)
    assert pool(m, "full", "requests") == 0 and pool(m, "swa", "requests") == 0
    assert m["swakv_num_requests_running"] == 0 and m["swakv_num_requests_waiting"] == 0
    assert not [k for k in m if 'status="500"' in k]  # never a 500 for bad input
    assert m['swakv_http_requests_total{endpoint="/v1/chat/completions",status="400"}'] > 0
