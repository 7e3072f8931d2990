"""Server lifecycle on the real process: /metrics, client disconnects, responsiveness
during a long prefill, no busy spin when idle, and draining on SIGTERM."""

from __future__ import annotations

import json
import os
import threading
import time

import httpx
import pytest

from swakv.server.testing import ServerProcess, pool, scrape

ARGS = ["--served-model-name", "tiny", "--page-size", "4", "--kv-memory", "32MiB",
        "--num-threads", "1"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from swakv.model.testing import make_tiny_gemma3_dir

    return make_tiny_gemma3_dir(tmp_path_factory.mktemp("tiny-life"), num_layers=4, window=8,
                                vocab=128)


@pytest.fixture(scope="module")
def server(tiny_dir):
    with ServerProcess.start(["--model", str(tiny_dir), *ARGS, "--chunk-size", "64"]) as proc:
        yield proc


def stream_request(max_tokens: int, prompt: str = "Stream for a while") -> dict:
    return {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "stream": True,
            "ignore_eos": True, "temperature": 0}


def wait_until(predicate, timeout: float, interval: float = 0.02) -> float:
    """Seconds until predicate() held; fails after `timeout`."""
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout, "condition not reached in time"
        time.sleep(interval)
    return time.monotonic() - t0


def test_metrics_parse_and_pool_gauges_move(server):
    base = scrape(server.url)
    for name in ("swakv_prefix_hit_tokens_total", "swakv_prefix_window_miss_tokens_total",
                 "swakv_prefix_full_miss_tokens_total", "swakv_retractions_total",
                 "swakv_num_requests_waiting", "swakv_num_requests_running",
                 "swakv_request_latency_seconds_count", "swakv_time_to_first_token_seconds_count",
                 "swakv_step_time_seconds_count"):
        assert name in base, name
    for p in ("full", "swa"):
        assert pool(base, p, "total") > 0
        assert pool(base, p, "free") + pool(base, p, "used") == pool(base, p, "total")
        assert pool(base, p, "requests") == 0
    seen_running = []
    with httpx.stream("POST", server.url + "/v1/completions", json=stream_request(400),
                      timeout=60) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: ") and not seen_running:
                m = scrape(server.url)
                seen_running.append(m)
    during = seen_running[0]
    assert during["swakv_num_requests_running"] == 1
    assert pool(during, "full", "requests") > 0 and pool(during, "swa", "requests") > 0
    after = scrape(server.url)
    assert pool(after, "full", "requests") == 0 and pool(after, "swa", "requests") == 0
    assert after["swakv_num_requests_running"] == 0
    assert after["swakv_request_latency_seconds_count"] == (
        base["swakv_request_latency_seconds_count"] + 1)
    assert after["swakv_time_to_first_token_seconds_count"] >= 1
    assert after["swakv_step_time_seconds_count"] > base["swakv_step_time_seconds_count"]
    # the finished request's KV went to the prefix cache, so a repeat hits it
    assert pool(after, "full", "cached") > pool(base, "full", "cached")


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", stream_request(1000)),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "go"}],
                              "max_tokens": 1000, "stream": True, "ignore_eos": True}),
])
def test_disconnect_mid_stream_frees_kv_within_1s(server, path, body):
    aborted = scrape(server.url)["swakv_requests_aborted_total"]
    with httpx.stream("POST", server.url + path, json=body, timeout=60) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        for _ in range(5):
            next(lines)
        m = scrape(server.url)
        assert pool(m, "full", "requests") > 0
        # leaving the block closes the connection mid-stream
    elapsed = wait_until(lambda: pool(scrape(server.url), "full", "requests") == 0, 1.0)
    m = scrape(server.url)
    assert pool(m, "swa", "requests") == 0 and m["swakv_num_requests_running"] == 0
    assert m["swakv_requests_aborted_total"] == aborted + 1
    assert elapsed < 1.0


def test_disconnect_non_streaming_aborts(server):
    aborted = scrape(server.url)["swakv_requests_aborted_total"]
    body = {"model": "tiny", "prompt": "long", "max_tokens": 1000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=0.3)
    wait_until(lambda: scrape(server.url)["swakv_requests_aborted_total"] == aborted + 1, 1.5)
    assert pool(scrape(server.url), "full", "requests") == 0


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_idle_server_does_not_spin(server):
    time.sleep(0.3)
    before = _cpu_seconds(server.proc.pid)
    time.sleep(1.5)
    assert _cpu_seconds(server.proc.pid) - before < 0.15


def test_health_responsive_during_long_prefill(tmp_path):
    """One long prefill step (a bigger model, no chunking): /health still answers fast."""
    from swakv.model.testing import make_tiny_gemma3_dir

    path = make_tiny_gemma3_dir(tmp_path / "medium", num_layers=6, window=64, vocab=128,
                                hidden=512, intermediate=2048, heads=8, kv_heads=4,
                                head_dim=64, max_position_embeddings=8192)
    n_prompt = 6000  # 3,000 fell to ~0.5 s once bf16 norms and GELU were fused
    with ServerProcess.start(["--model", str(path), "--served-model-name", "tiny",
                              "--page-size", "16", "--kv-memory", "256MiB",
                              "--chunk-size", "8192"]) as srv:
        body = {"model": "tiny", "prompt": [7] * n_prompt, "max_tokens": 2, "ignore_eos": True}
        result: dict = {}
        worker = threading.Thread(
            target=lambda: result.update(r=httpx.post(srv.url + "/v1/completions", json=body,
                                                      timeout=120)))
        t0 = time.monotonic()
        worker.start()
        def queued() -> bool:
            m = scrape(srv.url)
            return m["swakv_num_requests_running"] + m["swakv_num_requests_waiting"] == 1

        wait_until(queued, 10, 0.005)
        latencies = []
        with httpx.Client(timeout=5) as c:
            while worker.is_alive():
                t = time.monotonic()
                assert c.get(srv.url + "/health").status_code == 200
                latencies.append(time.monotonic() - t)
                time.sleep(0.02)
        busy = time.monotonic() - t0
        assert result["r"].status_code == 200
        assert busy > 0.5, f"prefill too short ({busy:.2f}s) to test responsiveness"
        assert len(latencies) >= 5
        print(f"prefill busy {busy:.2f}s, {len(latencies)} probes, slowest {max(latencies)*1000:.1f}ms")
        assert max(latencies) < 0.1, f"slowest /health {max(latencies):.3f}s during {busy:.1f}s"


def test_sigterm_drains_in_flight_streams(tiny_dir):
    with ServerProcess.start(["--model", str(tiny_dir), *ARGS]) as srv:
        events: list[str] = []

        def consume() -> None:
            with httpx.stream("POST", srv.url + "/v1/completions", json=stream_request(1000),
                              timeout=60) as resp:
                for line in resp.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])

        worker = threading.Thread(target=consume)
        worker.start()
        wait_until(lambda: len(events) >= 3, 30)
        srv.proc.send_signal(15)
        time.sleep(0.3)
        if worker.is_alive():  # stopped accepting: a new connection is refused
            with pytest.raises(httpx.ConnectError):
                httpx.get(srv.url + "/health", timeout=2)
        worker.join(60)
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert srv.proc.wait(30) == 0
