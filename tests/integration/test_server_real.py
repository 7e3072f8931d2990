"""Fresh-clone check on the real default model (slow): the README's `make serve`
(run through make itself, default settings but a free port) starts on bf16 where the
CPU has it and says the model is a base model; the README's curl, openai (completion
and chat), /tokenize examples answer as the README says."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from swakv.server.testing import free_port, wait_healthy

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def readme_block(lang: str, needle: str) -> str:
    for block in re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S):
        if needle in block:
            return block
    raise AssertionError(f"README has no {lang} block with {needle!r}")


class MakeServe:
    """`make serve ARGS="--port N"` from the repo root, exactly as the README says, in
    its own process group (make and the server it starts are killed together)."""

    def __init__(self, timeout: float = 240.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="make-serve-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            ["make", "-C", str(ROOT), "serve", f"ARGS=--port {self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            wait_healthy(self.url, self.proc, timeout, self.output)
        except TimeoutError:
            self.kill()
            raise

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


@pytest.fixture(scope="module")
def server():
    assert "make serve" in README and "$(BIN)/swakv serve $(ARGS)" in (ROOT / "Makefile").read_text()
    proc = MakeServe()
    try:
        yield proc
    finally:
        proc.kill()


def readme_command(name: str) -> str:
    """The README's first `name` command (with its backslash continuations), from an
    sh block."""
    for block in re.findall(r"```sh\n(.*?)```", README, flags=re.S):
        match = re.search(rf"^{name} .*?(?<!\\)$", block, flags=re.S | re.M)
        if match:
            return match.group(0)
    raise AssertionError(f"README has no {name} command")


def _local(text: str, server) -> str:
    return text.replace("127.0.0.1:8000", f"127.0.0.1:{server.port}")


def test_started_on_bf16_where_native_and_said_base_model(server):
    from swakv.config import native_bf16_supported

    log = server.output()
    if native_bf16_supported():  # this machine: avx512_bf16
        assert "dtype bfloat16 (--dtype auto: the CPU has native bf16 support)" in log
    else:
        assert "dtype float32 (--dtype auto: the CPU has no native bf16 support)" in log
    assert "is a BASE (pretrained) model" in log
    assert "KV pools: full" in log and f"http://127.0.0.1:{server.port}" in log


def test_readme_quick_start_curl(server):
    curl = _local(readme_command("curl"), server)
    assert "/v1/completions" in curl
    out = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=120,
                         check=True)
    body = json.loads(out.stdout)
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == " Paris. The capital of Germany is Berlin"  # as the README says
    assert " Paris. The capital of Germany is Berlin" in README
    assert body["usage"]["total_tokens"] == (body["usage"]["prompt_tokens"]
                                             + body["usage"]["completion_tokens"])


def test_readme_openai_examples(server):
    completion = _local(readme_block("python", "client.completions.create("), server)
    out = subprocess.run([sys.executable, "-c", completion], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.startswith(" red, blue, and yellow.")
    chat = _local(readme_block("python", "client.chat.completions.create("), server)
    out = subprocess.run([sys.executable, "-c", chat], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout == "The capital of Italy is Rome.\n"


def test_readme_tokenize_round_trip_multilingual(server):
    import httpx

    text = "Grüße, 世界! Привет, мир. مرحبا 🙂"
    tokens = httpx.post(server.url + "/tokenize", json={"prompt": text,
                                                        "add_special_tokens": False}).json()
    assert httpx.post(server.url + "/detokenize",
                      json={"tokens": tokens["tokens"]}).json() == {"prompt": text}
    readme = httpx.post(server.url + "/tokenize", json={"prompt": "Grüße, 世界",
                                                        "add_special_tokens": False}).json()
    assert f'"tokens":{json.dumps(readme["tokens"], separators=(",", ":"))}' in README


def test_return_token_ids_decode_to_the_text(server):
    import openai

    from swakv.model.loader import resolve_model
    from swakv.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(resolve_model(None))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    stream = client.completions.create(model="gemma3-270m", prompt="Three primary colors are",
                                       max_tokens=12, temperature=0, stream=True,
                                       extra_body={"return_token_ids": True})
    ids, text = [], ""
    for chunk in stream:
        for c in chunk.choices:
            ids += c.model_extra["token_ids"]
            text += c.text
    assert len(ids) == 12 and tokenizer.decode(ids) == text


def test_greedy_equals_in_process_engine(server):
    import openai

    from swakv.engine.llm import LLM
    from swakv.sampling_params import SamplingParams

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    prompt = "The capital of France is"
    out = client.completions.create(model="gemma3-270m", prompt=prompt, max_tokens=12,
                                    temperature=0)
    llm = LLM(None, kv_memory=256 << 20)
    ref = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12))[0]
    assert out.choices[0].text == ref.text
