"""Issue 13 against a live server on loopback (tiny model): findings 1, 10 and 11, the
HTTP fuzz (random JSON bodies: never a 5xx, never a hang), the soak (200 concurrent
streams with random n and disconnects) and fault injection over HTTP.

After each: /health is 200 and no KV is pinned by requests (pools at baseline)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import threading
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swakv.server.testing import InProcessServer, ServerProcess, pool, scrape

VOCAB = 128
MAX_CONTEXT = 128
MAX_N = 4
CHAT = "/v1/chat/completions"
TEXT = "/v1/completions"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from swakv.model.testing import make_tiny_gemma3_dir

    return make_tiny_gemma3_dir(tmp_path_factory.mktemp("tiny-hardening"), num_layers=3,
                                window=8, vocab=VOCAB)


@pytest.fixture(scope="module")
def server(tiny_dir):
    with ServerProcess.start([
            "--model", str(tiny_dir), "--served-model-name", "tiny", "--page-size", "4",
            "--kv-memory", "8MiB", "--max-context", str(MAX_CONTEXT), "--max-n", str(MAX_N),
            "--max-request-bytes", str(8 << 20), "--num-threads", "1", "--chunk-size", "64",
            "--max-running-requests", "32"]) as proc:
        yield proc


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def assert_openai_error(resp: httpx.Response, status: int, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


def wait_idle(url: str, timeout: float = 10.0) -> dict:
    """Metrics once no request is live and no KV is pinned by requests."""
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(url)
        idle = (m["swakv_num_requests_running"] == 0 and m["swakv_num_requests_waiting"] == 0
                and pool(m, "full", "requests") == 0 and pool(m, "swa", "requests") == 0)
        if idle:
            return m
        assert time.monotonic() < deadline, f"server not idle: {m}"
        time.sleep(0.05)


def assert_healthy_and_idle(url: str) -> None:
    """/health is 200, no KV is pinned by requests, and the engine still generates."""
    assert httpx.get(url + "/health", timeout=5).status_code == 200
    wait_idle(url)
    ok = httpx.post(url + TEXT, timeout=30, json={"model": "tiny", "prompt": [5, 6, 7],
                                                  "max_tokens": 3, "ignore_eos": True})
    assert ok.status_code == 200, ok.text
    assert ok.json()["usage"]["completion_tokens"] == 3
    wait_idle(url)


# ------------------------------------------------------- wrong types, out-of-range ids
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("prompt, message", [
    ([VOCAB], "out of range"), ([[1, 2], [3, VOCAB]], "out of range"),
    ([-1], "out of range"), ([2**63], "out of range"), ([2**64], "out of range"),
    ([-(2**63) - 1], "out of range"),
    ([1.5], "must be one of"), ([True], "must be one of"), ([1, "2"], "must be one of"),
    ([[1], "x"], "must be one of"), ([None], "must be one of"), (5, "must be one of"),
    ({"a": 1}, "must be one of"), ([[1], []], "at least one token")])
def test_bad_prompt_token_ids_are_400_on_prompt_and_engine_serves(http, server, prompt,
                                                                   message, stream):
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 2, "stream": stream}
    err = assert_openai_error(http.post(TEXT, json=body), 400, "prompt")
    assert message in err["message"]
    assert_healthy_and_idle(server.url)


@pytest.mark.parametrize("messages, param", [
    ("hi", "messages"), ([{"role": "user", "content": 5}], "messages.0.content"),
    ([["user", "hi"]], "messages.0"), ([{"role": 3, "content": "hi"}], "messages.0.role")])
def test_wrong_message_types_are_400_and_engine_serves(http, server, messages, param):
    body = {"model": "tiny", "messages": messages, "max_tokens": 2}
    assert_openai_error(http.post(CHAT, json=body), 400, param)
    assert_healthy_and_idle(server.url)


# ------------------------------------------------------------------- early disconnects
def raw_post(url: str, path: str, body: bytes, send_bytes: int | None = None) -> None:
    """POST `body` over a raw socket, sending only its first `send_bytes` bytes (all by
    default), then close without reading the answer."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    head = (f"POST {path} HTTP/1.1\r\nHost: {parts.hostname}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    with socket.create_connection((parts.hostname, parts.port), timeout=5) as sock:
        sock.sendall(head.encode() + body[: len(body) if send_bytes is None else send_bytes])


@pytest.mark.parametrize("path", [CHAT, TEXT])
@pytest.mark.parametrize("stream", [False, True])
def test_early_disconnects_leave_no_request_behind(server, path, stream):
    prompt = {"messages": [{"role": "user", "content": "go"}]} if path == CHAT else {
        "prompt": [5, 6, 7]}
    body = json.dumps({"model": "tiny", "max_tokens": MAX_CONTEXT - 30, "ignore_eos": True,
                       "stream": stream, **prompt}).encode()
    aborted = scrape(server.url)["swakv_requests_aborted_total"]
    raw_post(server.url, path, body, send_bytes=len(body) // 2)  # body cut short
    raw_post(server.url, path, b"", send_bytes=0)  # headers only, then gone
    for _ in range(3):  # whole request, gone before any answer: the engine aborts it
        raw_post(server.url, path, body)
    deadline = time.monotonic() + 10
    while scrape(server.url)["swakv_requests_aborted_total"] < aborted + 3:
        assert time.monotonic() < deadline, "disconnected requests were not aborted"
        time.sleep(0.05)
    assert_healthy_and_idle(server.url)


# ---------------------------------------------------------------------------- finding 1
@pytest.mark.parametrize("path", [CHAT, TEXT])
@pytest.mark.parametrize("ids", [[VOCAB + 5], [-1], [1, VOCAB]])
def test_f01_out_of_range_stop_token_ids_are_400(http, server, path, ids):
    body = {"model": "tiny", "max_tokens": 3, "min_tokens": 1, "stop_token_ids": ids}
    body |= {"messages": [{"role": "user", "content": "hi"}]} if path == CHAT else {"prompt": "hi"}
    assert_openai_error(http.post(path, json=body), 400, "stop_token_ids")
    ok = http.post(path, json={**body, "stop_token_ids": [VOCAB - 1]})
    assert ok.status_code == 200, ok.text
    assert_healthy_and_idle(server.url)


# --------------------------------------------------------------------------- finding 10
def test_f10_tokenisation_runs_off_the_event_loop(http, server):
    # A 4 MiB string prompt takes seconds to tokenise (the tiny tokenizer is per
    # character); /health must keep answering meanwhile.
    body = {"model": "tiny", "prompt": "x" * (4 << 20), "max_tokens": 1}
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(
        r=httpx.post(server.url + TEXT, json=body, timeout=120)))
    t0 = time.monotonic()
    worker.start()
    latencies = []
    with httpx.Client(timeout=5) as c:
        time.sleep(0.2)
        while worker.is_alive():
            t = time.monotonic()
            assert c.get(server.url + "/health").status_code == 200
            latencies.append(time.monotonic() - t)
            time.sleep(0.05)
    busy = time.monotonic() - t0
    assert busy > 1.0, f"tokenisation too short ({busy:.2f}s) to test responsiveness"
    assert_openai_error(result["r"], 400, "prompt")  # longer than the context
    assert len(latencies) >= 5 and max(latencies) < 0.5, (busy, max(latencies))


# --------------------------------------------------------------------------- finding 11
@pytest.mark.parametrize("path", [CHAT, TEXT])
def test_f11_deeply_nested_json_is_400(http, path):
    raw = '{"model": "tiny", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    err = assert_openai_error(http.post(path, content=raw,
                                        headers={"content-type": "application/json"}), 400)
    assert err["code"] == "invalid_json"


@pytest.mark.parametrize("path", [CHAT, TEXT])
@pytest.mark.parametrize("field, value", [
    ("stream", "yes"), ("stream", 1), ("ignore_eos", "true"), ("n", "2"), ("n", True),
    ("max_tokens", 3.5), ("max_tokens", "3"), ("temperature", "0.5"), ("seed", False),
    ("stop_token_ids", [1, True])])
def test_f11_booleans_and_integers_are_strict(http, path, field, value):
    body = {"model": "tiny", "max_tokens": 2, field: value}
    body |= {"messages": [{"role": "user", "content": "hi"}]} if path == CHAT else {"prompt": "hi"}
    err = assert_openai_error(http.post(path, json=body), 400)
    assert err["param"].split(".")[0] == field


@pytest.mark.parametrize("path", [CHAT, TEXT])
def test_f11_stop_sequences_are_bounded(http, path):
    body = {"model": "tiny", "max_tokens": 2, "stop": [f"s{i}" for i in range(1000)]}
    body |= {"messages": [{"role": "user", "content": "hi"}]} if path == CHAT else {"prompt": "hi"}
    err = assert_openai_error(http.post(path, json=body), 400, "stop")
    assert "at most 4" in err["message"]
    assert http.post(path, json={**body, "stop": ["a", "b", "c", "d"]}).status_code == 200


@pytest.mark.parametrize("role", ["user", "system"])
def test_f11_null_content_refused_except_for_assistant(http, role):
    msgs = [{"role": role, "content": None}, {"role": "user", "content": "hi"}][: 1 + (role != "user")]
    assert_openai_error(http.post(CHAT, json={"model": "tiny", "messages": msgs,
                                              "max_tokens": 2}), 400, "messages.0.content")
    ok = http.post(CHAT, json={"model": "tiny", "max_tokens": 2, "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": None},
        {"role": "user", "content": "more"}]})
    assert ok.status_code == 200, ok.text


# ------------------------------------------------------------------------- HTTP fuzz
COMMON_KEYS = ["model", "stream", "stream_options", "n", "max_tokens", "temperature", "top_p",
               "seed", "stop", "frequency_penalty", "presence_penalty", "logit_bias", "user",
               "top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos",
               "stop_token_ids"]
CHAT_KEYS = ["messages", "max_completion_tokens", "logprobs", "top_logprobs", "tools",
             "tool_choice", "functions", "response_format"]
TEXT_KEYS = ["prompt", "logprobs", "echo", "suffix", "best_of"]

json_leaf = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
             | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12))
json_any = st.recursive(json_leaf, lambda c: st.lists(c, max_size=4)
                        | st.dictionaries(st.text(max_size=6), c, max_size=4), max_leaves=12)


def mostly(valid, invalid, odds: int = 6):
    """`valid` values most of the time, `invalid` ones about 1 in `odds`."""
    return st.one_of(*([valid] * (odds - 1)), invalid)


token_ids = mostly(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=40),
                   st.lists(st.integers(-3, VOCAB + 3), max_size=40))
message = st.fixed_dictionaries(
    {"role": mostly(st.sampled_from(["system", "user", "assistant", "developer"]),
                    st.sampled_from(["tool", "robot", 3, None])),
     "content": mostly(st.text(max_size=40), st.none() | st.lists(st.fixed_dictionaries(
         {"type": st.sampled_from(["text", "image_url"]), "text": st.text(max_size=10)}),
         max_size=2))})
PLAUSIBLE = {
    "model": mostly(st.just("tiny"), st.sampled_from(["other", ""])),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "n": mostly(st.integers(1, MAX_N), st.integers(-1, MAX_N + 3)),
    "max_tokens": mostly(st.integers(1, 24), st.integers(-2, MAX_CONTEXT + 8)),
    "max_completion_tokens": mostly(st.integers(1, 24), st.integers(-2, 400)),
    "temperature": mostly(st.floats(0, 2), st.floats(-1, 3)),
    "top_p": mostly(st.floats(0.01, 1), st.floats(-0.1, 1.2)),
    "top_k": st.integers(-3, VOCAB + 2),
    "min_p": st.floats(-0.1, 1.1),
    "seed": mostly(st.integers(0, 2**63 - 1), st.integers(-5, 2**64)),
    "stop": mostly(st.text(min_size=1, max_size=3) | st.lists(st.text(min_size=1, max_size=3),
                                                              max_size=4),
                   st.lists(st.text(max_size=4), max_size=8)),
    "frequency_penalty": st.floats(-2.5, 2.5),
    "presence_penalty": st.floats(-2.5, 2.5),
    "repetition_penalty": st.floats(-0.5, 2.0),
    "min_tokens": st.integers(-1, 6),
    "ignore_eos": st.booleans(),
    "stop_token_ids": token_ids,
    "logprobs": st.booleans() | st.integers(-1, 22),
    "top_logprobs": st.integers(-1, 22),
    "messages": mostly(st.lists(message, min_size=1, max_size=3), st.lists(message, max_size=0)),
    "prompt": (st.text(min_size=1, max_size=60) | token_ids | st.lists(token_ids, max_size=3)
               | st.lists(st.text(max_size=10), max_size=3)),
}


@st.composite
def bodies(draw):
    chat = draw(st.booleans())
    keys = COMMON_KEYS + (CHAT_KEYS if chat else TEXT_KEYS)
    body = {"model": "tiny", ("messages" if chat else "prompt"):
            draw(PLAUSIBLE["messages" if chat else "prompt"]), "max_tokens": 4}
    for key in draw(st.lists(st.sampled_from(keys), max_size=3, unique=True)):
        plausible = PLAUSIBLE.get(key)
        use_any = plausible is None or draw(st.integers(0, 7)) == 0
        body[key] = draw(json_any if use_any else plausible)
    if draw(st.integers(0, 19)) == 0:
        del body["model"]
    return (CHAT if chat else TEXT), body


def check_response(resp: httpx.Response, stream: bool) -> None:
    assert resp.status_code < 500, f"{resp.status_code}: {resp.text[:500]}"
    if resp.status_code >= 400:
        err = resp.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        return
    if stream:
        events = [line for line in resp.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        for e in events[:-1]:
            payload = json.loads(e[6:])
            assert "error" not in payload, payload
    else:
        assert resp.json()["choices"]


FUZZ_EXAMPLES = int(os.environ.get("SWAKV_HTTP_FUZZ_EXAMPLES", 500))


@pytest.mark.slow
def test_http_fuzz_never_5xx_never_hangs(server):
    statuses: dict[int, int] = {}
    with httpx.Client(base_url=server.url, timeout=30) as c:

        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=bodies())
        def one(case):
            path, body = case
            raw = json.dumps(body)
            resp = c.post(path, content=raw, headers={"content-type": "application/json"})
            statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
            check_response(resp, body.get("stream") is True)

        one()
    print("fuzz statuses:", statuses)
    assert sum(statuses.values()) >= FUZZ_EXAMPLES
    assert statuses.get(200, 0) >= FUZZ_EXAMPLES // 10, statuses  # many reach the engine
    assert_healthy_and_idle(server.url)


# ------------------------------------------------------------------------------ soak
@pytest.mark.slow
def test_soak_200_concurrent_streams_with_disconnects(server):
    rng = random.Random(13)
    plans = [{"n": rng.randint(1, 3), "max_tokens": rng.randint(1, 40),
              "prompt": [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 60))],
              "chat": rng.random() < 0.4,
              "drop_after": rng.choice([None, None, 0, 1, 3, 8])} for _ in range(200)]

    async def one(client: httpx.AsyncClient, plan: dict) -> str:
        if plan["chat"]:
            path, body = CHAT, {"messages": [{"role": "user", "content": "x" * len(plan["prompt"])}]}
        else:
            path, body = TEXT, {"prompt": plan["prompt"]}
        body |= {"model": "tiny", "stream": True, "n": plan["n"], "ignore_eos": True,
                 "max_tokens": plan["max_tokens"], "temperature": 0.7, "seed": 1}
        async with client.stream("POST", path, json=body) as resp:
            assert resp.status_code == 200, await resp.aread()
            seen = 0
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    return "done"
                assert "error" not in json.loads(line[6:]), line
                seen += 1
                if plan["drop_after"] is not None and seen > plan["drop_after"]:
                    return "dropped"  # leaving the block closes the connection
        raise AssertionError("stream ended without [DONE]")

    async def main() -> list[str]:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client:
            return await asyncio.gather(*(one(client, p) for p in plans))

    outcomes = asyncio.run(main())
    assert outcomes.count("done") + outcomes.count("dropped") == 200
    assert outcomes.count("dropped") > 20
    m = wait_idle(server.url, timeout=30)
    assert m["swakv_requests_aborted_total"] >= outcomes.count("dropped") * 0.5
    assert_healthy_and_idle(server.url)


# --------------------------------------------------------------------- fault injection
def test_fault_injection_fails_exactly_the_step_over_http(tiny_dir):
    """An exception in the model forward on a chosen step fails that step's requests
    with an error body (500 / an error event); requests outside the step (queued behind
    max_running 2) complete with the same outputs as a clean engine."""
    from swakv.config import EngineConfig, ServerConfig
    from swakv.engine.build import build_engine
    from swakv.sampling_params import SamplingParams
    from swakv.sched.sizing import PoolSizes
    from swakv.server.app import create_app
    from swakv.server.async_engine import AsyncEngine
    from swakv.server.metrics import ServerMetrics

    cfg = EngineConfig(page_size=4, chunk_size=32, max_running_requests=2)
    prompts = [[5 + i, 9, 11 + i, 20] for i in range(4)]
    clean = build_engine(str(tiny_dir), cfg, sizes=PoolSizes(256, 64, 4, 0, 0))
    want = []
    for p in prompts[2:]:
        r = clean.add_request(p, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
        while not r.is_finished:
            clean.step()
        want.append(r.output_ids)

    core = build_engine(str(tiny_dir), cfg, sizes=PoolSizes(256, 64, 4, 0, 0))
    armed, entered = threading.Event(), threading.Event()
    real = core.runner.forward
    fired = []

    def forward(items, *a, **kw):
        if armed.is_set() and not fired and len(items) == 2:
            fired.append([it.row for it in items])
            raise RuntimeError("injected fault")
        if len(items) == 2:
            entered.set()
        return real(items, *a, **kw)

    core.runner.forward = forward
    holder: list[AsyncEngine] = []
    metrics = ServerMetrics(lambda: holder[0].snapshot)
    engine = AsyncEngine(core, metrics)
    holder.append(engine)
    app = create_app(ServerConfig(served_model_name="tiny"), engine, metrics)
    with InProcessServer(app) as srv:
        def body(p, stream, max_tokens):
            return {"model": "tiny", "prompt": p, "max_tokens": max_tokens, "stream": stream,
                    "ignore_eos": True, "temperature": 0}

        results: dict[int, httpx.Response] = {}

        def post(i, stream, max_tokens):
            results[i] = httpx.post(srv.url + TEXT, json=body(prompts[i], stream, max_tokens),
                                    timeout=60)

        victims = [threading.Thread(target=post, args=(0, False, 200)),
                   threading.Thread(target=post, args=(1, True, 200))]
        for t in victims:
            t.start()
        assert entered.wait(20), "the two victims never ran together"
        others = [threading.Thread(target=post, args=(i, False, 8)) for i in (2, 3)]
        for t in others:
            t.start()
        deadline = time.monotonic() + 20
        while engine.snapshot.num_waiting < 2:  # 2 and 3 queue behind max_running 2
            assert time.monotonic() < deadline and not results, "victims ended too soon"
            time.sleep(0.001)
        armed.set()
        for t in victims + others:
            t.join(60)
        err = assert_openai_error(results[0], 500)
        assert err["type"] == "server_error" and "injected fault" in err["message"]
        assert results[1].status_code == 200  # the stream had started: an error event
        events = [json.loads(x[6:]) for x in results[1].text.splitlines()
                  if x.startswith("data: {")]
        assert events[-1]["error"]["type"] == "server_error"
        assert "data: [DONE]" in results[1].text
        for i in (2, 3):
            assert results[i].status_code == 200, results[i].text
        assert len(fired) == 1 and len(fired[0]) == 2
        outs = [clean.tokenizer.decode(t) for t in want]
        assert [results[i].json()["choices"][0]["text"] for i in (2, 3)] == outs
        assert httpx.get(srv.url + "/health").status_code == 200
        wait_idle(srv.url)
    engine.stop()
    core.check_integrity()
    core.flush_cache()
    assert core.allocator.available() == core.allocator.total()
