"""PD serving with real processes on loopback: `swakv router` + `swakv serve --role
prefill` + `swakv serve --role decode` (tiny Gemma 3, fp32, one torch thread each),
driven by the official `openai` client.

The prefill worker's SWA pool is deliberately small (about 270 tokens): every prompt
of 512 or 3,000 tokens is longer than it (acceptance 3).
"""

from __future__ import annotations

import random
import signal
import string
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from swakv.config import KVLayout
from swakv.memory.pages import page_floor, swa_tail_len
from swakv.server.testing import ServerProcess, pool, scrape

pytestmark = pytest.mark.slow

WINDOW, PAGE, MODEL = 8, 4, "tiny"
COMMON = ["--served-model-name", MODEL, "--page-size", str(PAGE), "--chunk-size", "64",
          "--max-running-requests", "8", "--num-threads", "1", "--dtype", "float32",
          "--frontier-stride", "4", "--decode-reserve", "16", "--pd-heartbeat-interval", "0.5",
          "--pd-peer-timeout", "5", "--log-level", "warning"]
PREFILL = ["--role", "prefill", "--kv-memory", "4MiB", "--swa-fraction", "0.05"]
DECODE = ["--role", "decode", "--kv-memory", "16MiB"]
ENV = {"MC_LOG_LEVEL": "ERROR"}


def make_tiny_dir(path) -> str:
    from swakv.model.testing import make_tiny_gemma3_dir

    make_tiny_gemma3_dir(path, num_layers=4, window=WINDOW, vocab=128, seed=5)
    return str(path)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_dir(tmp_path_factory.mktemp("tiny-pd-serving"))


def start_worker(tiny_dir: str, role_args: list[str], extra=()) -> ServerProcess:
    return ServerProcess.start(["--model", tiny_dir, *COMMON, *role_args, *extra], env=ENV)


def start_router(prefill: list[str], decode: list[str]) -> ServerProcess:
    cmd = [sys.executable, "-m", "swakv.cli", "router", "--health-interval", "0.5",
           "--log-level", "warning"]
    if prefill:
        cmd += ["--prefill", *prefill]
    return ServerProcess.start(["--decode", *decode], command=cmd, env=ENV)


@contextmanager
def running_cluster(tiny_dir: str) -> Iterator[dict[str, ServerProcess]]:
    """A prefill worker, a decode worker and a router; every process is stopped on exit."""
    procs = []
    try:
        procs.append(start_worker(tiny_dir, PREFILL))
        procs.append(start_worker(tiny_dir, DECODE))
        procs.append(start_router([procs[0].url], [procs[1].url]))
        yield {"prefill": procs[0], "decode": procs[1], "router": procs[2]}
    finally:
        for p in procs:
            p.kill()


@pytest.fixture(scope="module")
def cluster(tiny_dir):
    with running_cluster(tiny_dir) as procs:
        yield procs


def reference_llm(tiny_dir: str):
    """The single-process engine, same settings (what every PD output must equal)."""
    from swakv.engine.llm import LLM

    return LLM(tiny_dir, page_size=PAGE, chunk_size=64, kv_memory=64 << 20, frontier_stride=4,
               decode_reserve=16, num_threads=1)


@pytest.fixture(scope="module")
def reference(tiny_dir):
    return reference_llm(tiny_dir)


def client(url: str):
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def text_of_tokens(llm, n: int, seed: int) -> str:
    """Random letters whose prompt (with BOS) is exactly n tokens."""
    rng = random.Random(seed)
    text = "".join(rng.choice(string.ascii_letters) for _ in range(n - 1))
    assert len(llm.encode(text)) == n
    return text


def bytes_per_token(llm) -> tuple[int, int]:
    layout = KVLayout.from_model(llm.engine.spec)
    return layout.bytes_per_token(sliding=False), layout.bytes_per_token(sliding=True)


def sent_bytes(prefill: ServerProcess) -> tuple[float, float]:
    m = scrape(prefill.url)
    key = 'swakv_pd_transfer_bytes_total{direction="sent",pool="%s",role="prefill"}'
    return m[key % "full"], m[key % "swa"]


def collect(stream, chat: bool) -> str:
    parts = []
    for chunk in stream:
        if chunk.choices:
            delta = chunk.choices[0].delta.content if chat else chunk.choices[0].text
            parts.append(delta or "")
    return "".join(parts)


@pytest.mark.parametrize("length", [100, 512, 3000])
def test_openai_client_outputs_equal_single_process(cluster, reference, length):
    """Acceptance 1: chat and completions, streaming and not, greedy, fp32."""
    from swakv.sampling_params import SamplingParams

    api = client(cluster["router"].url)
    text = text_of_tokens(reference, length, seed=length)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    want_completion = reference.generate([text], params)[0].text
    chat_text = text[: length - 20]  # the chat template adds a few tokens
    messages = [{"role": "user", "content": chat_text}]
    want_chat = reference.chat(messages, params)[0].text
    extra = {"ignore_eos": True}
    got = api.completions.create(model=MODEL, prompt=text, max_tokens=16, temperature=0,
                                 extra_body=extra)
    assert got.choices[0].text == want_completion
    assert got.usage.prompt_tokens == length
    stream = api.completions.create(model=MODEL, prompt=text, max_tokens=16, temperature=0,
                                    stream=True, extra_body=extra)
    assert collect(stream, chat=False) == want_completion
    got = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=16,
                                      temperature=0, extra_body=extra)
    assert got.choices[0].message.content == want_chat
    stream = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=16,
                                         temperature=0, stream=True, extra_body=extra)
    assert collect(stream, chat=True) == want_chat


def test_prefill_swa_pool_is_smaller_than_the_prompts_it_served(cluster):
    """Acceptance 3: the 512- and 3,000-token prompts above went through this pool."""
    m = scrape(cluster["prefill"].url)
    assert pool(m, "swa", "total") < 512
    assert m['swakv_pd_transfers_total{result="ok",role="prefill"}'] >= 12


def test_byte_counters_are_exact_for_3000_tokens(cluster, reference):
    """Acceptance 2: full bytes = L x full B/token, SWA bytes = swa_tail_len(L) x SWA B/token."""
    api = client(cluster["router"].url)
    ids = [random.Random(1).randrange(7, 100) for _ in range(3000)]
    before = sent_bytes(cluster["prefill"])
    got = api.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0)
    assert got.usage.prompt_tokens_details.cached_tokens == 0  # nothing reused: all of it moves
    after = sent_bytes(cluster["prefill"])
    full_bpt, swa_bpt = bytes_per_token(reference)
    full, swa = after[0] - before[0], after[1] - before[1]
    print(f"\nL = 3000: full {full:.0f} B = 3000 x {full_bpt}; SWA {swa:.0f} B = "
          f"{swa_tail_len(3000, WINDOW, PAGE)} x {swa_bpt}")
    assert full == 3000 * full_bpt
    assert swa == swa_tail_len(3000, WINDOW, PAGE) * swa_bpt
    received = scrape(cluster["decode"].url)
    assert received['swakv_pd_transfer_bytes_total{direction="received",pool="full",'
                    'role="decode"}'] == after[0]


def test_second_turn_moves_only_the_new_tokens(cluster, reference):
    """Acceptance 6: turn 2 = turn 1's prompt + its answer + a new message."""
    from swakv.sampling_params import SamplingParams

    api = client(cluster["router"].url)
    rng = random.Random(2)
    turn1 = [rng.randrange(7, 100) for _ in range(700)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    answer = reference.generate([turn1], params)[0]
    got = api.completions.create(model=MODEL, prompt=turn1, max_tokens=12, temperature=0,
                                 extra_body={"ignore_eos": True})
    assert got.choices[0].text == answer.text  # so the decode worker holds these token ids
    turn2 = turn1 + answer.token_ids + [rng.randrange(7, 100) for _ in range(60)]
    want = reference.generate([turn2], params)[0].text
    before = sent_bytes(cluster["prefill"])
    got = api.completions.create(model=MODEL, prompt=turn2, max_tokens=12, temperature=0,
                                 extra_body={"ignore_eos": True})
    after = sent_bytes(cluster["prefill"])
    assert got.choices[0].text == want
    hit = got.usage.prompt_tokens_details.cached_tokens
    assert hit == page_floor(len(turn1) + 12 - 1, PAGE)  # turn 1's committed KV
    full_bpt, swa_bpt = bytes_per_token(reference)
    n = len(turn2)
    swa_start = page_floor(max(hit, n - WINDOW), PAGE)
    print(f"\nturn 2 of {n} tokens, decode-side hit {hit}: full {after[0] - before[0]:.0f} B "
          f"(vs {n * full_bpt} for the whole prompt), SWA {after[1] - before[1]:.0f} B")
    assert after[0] - before[0] == (n - hit) * full_bpt
    assert after[1] - before[1] == (n - swa_start) * swa_bpt


def test_killed_prefill_worker_fails_fast_and_a_new_one_takes_over(cluster, reference,
                                                                   tiny_dir):
    """Acceptance 7 (runs last: it kills the module's prefill worker)."""
    import openai

    router, prefill, decode = cluster["router"], cluster["prefill"], cluster["decode"]
    api = client(router.url)

    def run(text: str, result: dict) -> None:
        t0 = time.monotonic()
        try:
            stream = api.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": text}], max_tokens=8,
                temperature=0, stream=True)
            result["text"] = collect(stream, chat=True)
        except openai.APIError as e:
            result["error"] = e
        result["seconds"] = time.monotonic() - t0

    # Freeze the prefill worker while the decode worker still waits for the request's
    # KV, then kill it. The tiny model prefills 3,000 tokens in tens of ms, so the
    # transfer can finish before the signal lands: such a try (a normal request) is
    # let go and another prompt tried, with a fresh baseline.
    for attempt in range(10):
        baseline = scrape(decode.url)
        text = text_of_tokens(reference, 3000, seed=77 + attempt)
        result: dict = {}
        thread = threading.Thread(target=run, args=(text, result))
        thread.start()
        deadline = time.monotonic() + 30
        while (scrape(prefill.url).get("swakv_num_requests_running", 0) < 1
               and thread.is_alive()):
            assert time.monotonic() < deadline, "prefill never started"
            time.sleep(0.005)
        prefill.proc.send_signal(signal.SIGSTOP)
        if scrape(decode.url)['swakv_pd_inflight_requests{role="decode"}'] >= 1:
            print(f"\nprefill stopped mid-transfer on try {attempt + 1}")
            break  # the stopped prefill worker still owes this request's KV
        prefill.proc.send_signal(signal.SIGCONT)
        thread.join(60)
        assert "text" in result, result
    else:
        pytest.fail("every request's KV arrived before its prefill worker could be stopped")
    prefill.proc.send_signal(signal.SIGKILL)
    prefill.proc.wait(10)
    thread.join(60)
    assert "error" in result, result
    assert result["seconds"] < 30
    after = scrape(decode.url)
    for p in ("full", "swa"):
        assert pool(after, p, "free") == pool(baseline, p, "free")
        assert pool(after, p, "requests") == 0  # no request of the dead peer holds pages
    assert after['swakv_pd_inflight_requests{role="decode"}'] == 0
    assert after['swakv_pd_prealloc_queue_length{role="decode"}'] == 0
    deadline = time.monotonic() + 10
    while any(w["url"] == prefill.url and w["alive"]
              for w in httpx.get(router.url + "/pd/workers").json()):
        assert time.monotonic() < deadline, "router still routes to the dead prefill worker"
        time.sleep(0.1)
    # a new prefill worker registers with the router; requests succeed again
    fresh = start_worker(tiny_dir, PREFILL, ["--pd-register", router.url])
    cluster["fresh"] = fresh
    try:
        deadline = time.monotonic() + 30
        while httpx.get(router.url + "/health").status_code != 200:
            assert time.monotonic() < deadline, httpx.get(router.url + "/pd/workers").text
            time.sleep(0.1)
        got = api.completions.create(model=MODEL, prompt=text, max_tokens=8, temperature=0)
        from swakv.sampling_params import SamplingParams

        assert got.choices[0].text == reference.generate(
            [text], SamplingParams(temperature=0, max_tokens=8))[0].text
    finally:
        fresh.kill()
