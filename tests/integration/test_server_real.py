"""Fresh-clone check on the real default model (slow): the README's `make serve`
(run through make itself, default settings but a free port) and its curl and openai
examples."""

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
        return Path(self.log.name).read_text(errors="replace")[-5000:]

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


def test_readme_curl_example(server):
    curl = readme_block("sh", "curl").replace("127.0.0.1:8000", f"127.0.0.1:{server.port}")
    out = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=120,
                         check=True)
    body = json.loads(out.stdout)
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"].strip()
    assert body["usage"]["total_tokens"] == (body["usage"]["prompt_tokens"]
                                             + body["usage"]["completion_tokens"])


def test_readme_openai_example(server):
    code = readme_block("python", "OpenAI(").replace("127.0.0.1:8000",
                                                     f"127.0.0.1:{server.port}")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip()


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
