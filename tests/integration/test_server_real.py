"""Fresh-clone check on the real default model (slow): the README's serve command
(`make serve` runs `.venv/bin/swakv serve`) and its curl and openai examples."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from swakv.server.testing import ServerProcess

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def readme_block(lang: str, needle: str) -> str:
    for block in re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S):
        if needle in block:
            return block
    raise AssertionError(f"README has no {lang} block with {needle!r}")


@pytest.fixture(scope="module")
def server():
    assert "$(BIN)/swakv serve" in (ROOT / "Makefile").read_text()
    exe = Path(sys.executable).parent / "swakv"  # .venv/bin/swakv, what `make serve` runs
    command = [str(exe), "serve"] if exe.exists() else [sys.executable, "-m", "swakv.cli",
                                                        "serve"]
    proc = ServerProcess.start([], timeout=170, command=command)  # README: defaults
    try:
        yield proc
    finally:
        proc.kill()


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
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
