"""Bad input and early disconnects through PD serving, real processes on loopback
(`swakv router` + prefill + decode workers, tiny Gemma 3; the set-up of
test_pd_serving.py, in a cluster of its own so that the requests here leave that
module's decode cache as its tests expect it): the workers' OpenAI 400s pass through
the router unchanged, a client that leaves aborts its request, and afterwards both
workers are idle (no request holds KV, nothing in flight) and go on serving."""

from __future__ import annotations

import random
import time

import httpx
import pytest
from test_pd_serving import MODEL, client, make_tiny_dir, reference_llm, running_cluster

from swakv.server.testing import free_port, pool, scrape

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_dir(tmp_path_factory.mktemp("tiny-pd-bad-input"))


@pytest.fixture(scope="module")
def cluster(tiny_dir):
    with running_cluster(tiny_dir) as procs:
        yield procs


@pytest.fixture(scope="module")
def reference(tiny_dir):
    return reference_llm(tiny_dir)


BAD_BODIES = [  # (path, body, param): the decode worker's own 400s, passed through unchanged
    ("/v1/completions", {"model": MODEL, "prompt": [5, 6, 500], "max_tokens": 2}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [-1], "max_tokens": 2}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": "many"}, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                              "temperature": "hot"}, "temperature"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, "messages"),
]


def idle(url: str, role: str) -> bool:
    """No request runs, waits or holds KV on this worker, and no PD request is in flight."""
    m = scrape(url)
    return (m["swakv_num_requests_running"] == m["swakv_num_requests_waiting"] == 0
            and pool(m, "full", "requests") == pool(m, "swa", "requests") == 0
            and m[f'swakv_pd_inflight_requests{{role="{role}"}}'] == 0
            and m.get(f'swakv_pd_prealloc_queue_length{{role="{role}"}}', 0) == 0)


def wait_idle(cluster, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not (idle(cluster["decode"].url, "decode") and idle(cluster["prefill"].url, "prefill")):
        assert time.monotonic() < deadline, "PD workers did not return to idle"
        time.sleep(0.05)


def assert_still_serving(cluster, reference) -> None:
    from swakv.sampling_params import SamplingParams

    ids = [random.Random(3).randrange(7, 100) for _ in range(40)]
    got = client(cluster["router"].url).completions.create(model=MODEL, prompt=ids,
                                                           max_tokens=6, temperature=0)
    assert got.choices[0].text == reference.generate(
        [ids], SamplingParams(temperature=0, max_tokens=6))[0].text


@pytest.mark.parametrize("path,body,param", BAD_BODIES)
def test_bad_requests_through_the_router_are_openai_400s(cluster, path, body, param):
    router = cluster["router"].url
    for stream in (False, True):
        r = httpx.post(router + path, json={**body, "stream": stream}, timeout=30)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["param"] == param
    for raw in (b"{not json", b"[1, 2]", b"\xff\xfe"):
        r = httpx.post(router + path, content=raw, timeout=30,
                       headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_bad_requests_and_logprobs_leave_the_workers_serving(cluster, reference):
    import openai

    api = client(cluster["router"].url)
    with pytest.raises(openai.BadRequestError) as e:
        api.completions.create(model=MODEL, prompt=[1, 2, 100000], max_tokens=2)
    assert e.value.status_code == 400 and "out of range" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:  # refused through PD (README: Limits)
        api.completions.create(model=MODEL, prompt="hi", max_tokens=2, logprobs=2)
    assert "logprobs" in e.value.message
    wait_idle(cluster)
    assert_still_serving(cluster, reference)
    wait_idle(cluster)


def test_a_bad_prefill_header_sent_straight_to_a_decode_worker(cluster, reference):
    """A malformed X-Swakv-Prefill is a 400; an address nobody answers at fails after
    the peer timeout (5 s) with a 503; the decode worker's control plane survives both."""
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    url = cluster["decode"].url + "/v1/completions"
    r = httpx.post(url, json=body, headers={"X-Swakv-Prefill": "not an address"}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == "x-swakv-prefill"
    t0 = time.monotonic()
    r = httpx.post(url, json=body, headers={"X-Swakv-Prefill": f"tcp://127.0.0.1:{free_port()}"},
                   timeout=30)
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable", r.text
    assert 4 < time.monotonic() - t0 < 15
    wait_idle(cluster)
    assert_still_serving(cluster, reference)
    wait_idle(cluster)


def test_clients_that_leave_early_abort_their_requests(cluster, reference):
    """A client gone mid-stream, one gone while waiting for a whole (non-streamed)
    answer, one gone during a 3,000-token prefill: the decode worker aborts each of
    them long before its max_tokens, both workers return to idle (no request
    holds KV, nothing in flight) and go on serving."""
    router = cluster["router"].url
    before = scrape(cluster["decode"].url)
    long_answer = {"model": MODEL, "prompt": "abc", "max_tokens": 3000, "ignore_eos": True}
    with httpx.stream("POST", router + "/v1/completions", json={**long_answer, "stream": True},
                      timeout=30) as r:
        assert r.status_code == 200
        chunks = r.iter_raw()
        for _ in range(3):
            assert next(chunks)
    long_prompt = [random.Random(4).randrange(7, 100) for _ in range(3000)]
    for body in (long_answer, {**long_answer, "prompt": long_prompt, "max_tokens": 1000}):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(router + "/v1/completions", json=body,
                       timeout=httpx.Timeout(30, read=0.5))
    deadline = time.monotonic() + 30
    while scrape(cluster["decode"].url)["swakv_requests_aborted_total"] < (
            before["swakv_requests_aborted_total"] + 3):
        assert time.monotonic() < deadline, (
            "the decode worker did not abort all three: "
            f"{scrape(cluster['decode'].url)['swakv_requests_aborted_total']} aborted, "
            f"{before['swakv_requests_aborted_total']} before")
        time.sleep(0.05)
    wait_idle(cluster)
    after = scrape(cluster["decode"].url)
    assert after["swakv_requests_aborted_total"] == before["swakv_requests_aborted_total"] + 3
    generated = after["swakv_generation_tokens_total"] - before["swakv_generation_tokens_total"]
    assert generated < 3000  # all three together: none ran to its max_tokens
    assert_still_serving(cluster, reference)
    wait_idle(cluster)

