"""PD serving on the real Gemma 3 270M (fp32): router + prefill + decode processes on
loopback; the openai client's greedy chat output equals the single-process engine's,
and the transfer moved the prompt's full KV and only the SWA tail."""

from __future__ import annotations

import sys

import pytest

from swakv.config import KVLayout
from swakv.memory.pages import swa_tail_len
from swakv.server.testing import ServerProcess, scrape

pytestmark = pytest.mark.slow

ARGS = ["--kv-memory", "256MiB", "--num-threads", "1", "--dtype", "float32",
        "--max-running-requests", "4", "--log-level", "warning"]
ENV = {"MC_LOG_LEVEL": "ERROR"}


def test_real_model_chat_through_pd_equals_single_process():
    from openai import OpenAI

    from swakv.engine.llm import LLM
    from swakv.sampling_params import SamplingParams

    llm = LLM(kv_memory=256 << 20, num_threads=1, dtype="float32")  # as the servers
    words = ("memory window layer page token cache prefill decode transfer budget "
             "router worker").split()
    content = "Summarise these words: " + " ".join(words[i % len(words)] for i in range(480))
    messages = [{"role": "user", "content": content}]
    num_prompt = len(llm.chat_prompt(messages))
    assert 500 < num_prompt < 600
    want = llm.chat(messages, SamplingParams(temperature=0, max_tokens=24))[0].text
    spec = llm.engine.spec
    del llm
    procs = []
    try:
        procs.append(ServerProcess.start(["--role", "prefill", *ARGS], env=ENV, timeout=300))
        procs.append(ServerProcess.start(["--role", "decode", *ARGS], env=ENV, timeout=300))
        router = ServerProcess.start(
            ["--decode", procs[1].url],
            command=[sys.executable, "-m", "swakv.cli", "router", "--prefill", procs[0].url],
            env=ENV)
        procs.append(router)
        api = OpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        got = api.chat.completions.create(model="gemma3-270m", messages=messages,
                                          max_tokens=24, temperature=0)
        assert got.choices[0].message.content == want
        assert got.usage.prompt_tokens == num_prompt
        m = scrape(procs[0].url)
        layout = KVLayout.from_model(spec)
        key = 'swakv_pd_transfer_bytes_total{direction="sent",pool="%s",role="prefill"}'
        assert m[key % "full"] == num_prompt * layout.bytes_per_token(sliding=False)
        assert m[key % "swa"] == (swa_tail_len(num_prompt, spec.window, 16)
                                  * layout.bytes_per_token(sliding=True))
    finally:
        for p in procs:
            p.kill()
