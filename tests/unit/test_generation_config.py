"""The model's generation config supplies sampling values a request leaves unset: parsing,
precedence, GGUF metadata, and the three places that apply it (server requests, `LLM`,
`swakv generate`), checked on the sampler's actual parameters."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from swakv.config import EngineConfig, ServerConfig
from swakv.engine.build import build
from swakv.model.generation_config import (
    GenerationConfig,
    GenerationConfigError,
    generation_config_from_gguf,
    load_generation_config,
)
from swakv.sampling_params import SamplingParams
from swakv.sched.sizing import PoolSizes

MODEL_CONFIG = {"temperature": 0.6, "top_k": 7, "top_p": 0.8, "bos_token_id": 2}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from swakv.model.testing import make_tiny_gemma3_dir

    path = tmp_path_factory.mktemp("tiny_genconfig")
    make_tiny_gemma3_dir(path, num_layers=3, window=8, vocab=128, seed=5,
                         generation_config=MODEL_CONFIG)
    return path


def test_from_dict_reads_only_sampling_keys():
    g = GenerationConfig.from_dict(MODEL_CONFIG, "f.json")
    assert g.defaults() == {"temperature": 0.6, "top_k": 7, "top_p": 0.8}
    assert g.describe() == "temperature=0.6, top_k=7, top_p=0.8 (from f.json)"
    assert GenerationConfig().describe() == "none"


def test_do_sample_false_without_temperature_is_greedy():
    assert GenerationConfig.from_dict({"do_sample": False}, "f").defaults() == {"temperature": 0.0}
    assert GenerationConfig.from_dict({"do_sample": False, "temperature": 0.3}, "f") \
        .temperature == 0.3
    assert GenerationConfig.from_dict({"do_sample": True}, "f").defaults() == {}


@pytest.mark.parametrize("data,message", [
    ({"temperature": "hot"}, "temperature must be a number"),
    ({"top_k": 2.5}, "top_k must be an integer"),
    ({"top_p": 0}, "top_p must be in (0, 1]"),
    ({"temperature": True}, "temperature must be a number"),
])
def test_bad_values_name_the_file(data, message):
    with pytest.raises(GenerationConfigError) as e:
        GenerationConfig.from_dict(data, "/m/generation_config.json")
    assert str(e.value).startswith("/m/generation_config.json: ") and message in str(e.value)


def test_precedence_request_then_model_then_fallback():
    g = GenerationConfig(temperature=0.6, top_k=7)
    assert g.apply({"temperature": None, "top_p": 0.5}, {"temperature": 0.0, "min_p": 0.1}) == {
        "temperature": 0.6, "top_k": 7, "top_p": 0.5, "min_p": 0.1}
    assert g.apply({"temperature": 1.3}) == {"temperature": 1.3, "top_k": 7}
    assert GenerationConfig().apply({"top_k": None}) == {}


def test_load_settings(tiny_dir, tmp_path):
    assert load_generation_config("auto", tiny_dir).defaults() == {
        "temperature": 0.6, "top_k": 7, "top_p": 0.8}
    assert load_generation_config("auto", tiny_dir).source == str(
        tiny_dir / "generation_config.json")
    assert load_generation_config("none", tiny_dir) == GenerationConfig()
    assert load_generation_config("auto", tmp_path) == GenerationConfig()  # no file: none
    other = tmp_path / "other"
    other.mkdir()
    (other / "generation_config.json").write_text(json.dumps({"top_p": 0.5}))
    assert load_generation_config(str(other), tiny_dir).defaults() == {"top_p": 0.5}
    assert load_generation_config(str(other / "generation_config.json"), tiny_dir).top_p == 0.5
    with pytest.raises(GenerationConfigError, match="no such file"):
        load_generation_config(str(tmp_path / "missing"), tiny_dir)
    (other / "generation_config.json").write_text("[1]")
    with pytest.raises(GenerationConfigError, match="not a JSON object"):
        load_generation_config(str(other), tiny_dir)


def test_gguf_sampling_metadata_maps_to_generation_config():
    import numpy as np

    meta = {"general.sampling.temp": np.float32(0.95), "general.sampling.top_k": np.int32(40),
            "general.sampling.top_p": None, "general.sampling.penalty_repeat": 1.1}
    assert generation_config_from_gguf(meta) == {"temperature": 0.95, "top_k": 40,
                                                 "repetition_penalty": 1.1}
    assert generation_config_from_gguf({}) == {}


# ---- applied: the sampler's actual params ------------------------------------------


def _recording_client(tiny_dir, generation_config: str):
    from swakv.server.app import create_app
    from swakv.server.async_engine import AsyncEngine
    from swakv.server.metrics import ServerMetrics

    built = build(str(tiny_dir), EngineConfig(page_size=4, generation_config=generation_config),
                  sizes=PoolSizes(64, 64, 4, 0, 0))
    seen: list[SamplingParams] = []
    real_add = built.engine.add_request

    def add_request(prompt_ids, params, request_id=None):
        seen.append(params)
        return real_add(prompt_ids, params, request_id=request_id)

    built.engine.add_request = add_request
    holder: list[AsyncEngine] = []
    metrics = ServerMetrics(lambda: holder[0].snapshot)
    holder.append(AsyncEngine(built.engine, metrics))
    app = create_app(ServerConfig(served_model_name="tiny"), holder[0], metrics, built.generation)
    return TestClient(app), seen


def test_server_requests_without_temperature_use_the_model_config(tiny_dir):
    client, seen = _recording_client(tiny_dir, "auto")
    with client:
        body = {"model": "tiny", "max_tokens": 3, "ignore_eos": True}
        assert client.post("/v1/completions", json={**body, "prompt": "hi"}).status_code == 200
        assert client.post("/v1/chat/completions", json={
            **body, "messages": [{"role": "user", "content": "hi"}]}).status_code == 200
        assert client.post("/v1/completions", json={
            **body, "prompt": "hi", "temperature": 1.5, "top_p": 0.3}).status_code == 200
    assert [(p.temperature, p.top_k, p.top_p) for p in seen] == [
        (0.6, 7, 0.8), (0.6, 7, 0.8), (1.5, 7, 0.3)]  # an explicit value wins


def test_generation_config_none_keeps_openai_defaults(tiny_dir):
    client, seen = _recording_client(tiny_dir, "none")
    with client:
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200
    assert (seen[0].temperature, seen[0].top_k, seen[0].top_p) == (1.0, 0, 1.0)


def test_llm_default_sampling_params(tiny_dir):
    from swakv.engine.llm import LLM

    llm = LLM(str(tiny_dir), page_size=4, kv_memory=8 << 20)
    assert llm.default_sampling_params(max_tokens=5) == SamplingParams(
        temperature=0.6, top_k=7, top_p=0.8, max_tokens=5)
    assert llm.default_sampling_params(temperature=0.0).temperature == 0.0
    assert llm.default_sampling_params(fallback={"min_p": 0.2, "top_k": 1}).top_k == 7
    seen: list[SamplingParams] = []
    real_add = llm.engine.add_request
    llm.engine.add_request = lambda ids, params, request_id=None: (
        seen.append(params) or real_add(ids, params, request_id=request_id))
    llm.generate("hello")
    llm.generate("hello", SamplingParams(max_tokens=2))  # explicit params: used as given
    assert [(p.temperature, p.top_k) for p in seen] == [(0.6, 7), (1.0, 0)]
    plain = LLM(str(tiny_dir), page_size=4, kv_memory=8 << 20, generation_config="none")
    assert plain.default_sampling_params() == SamplingParams()


def test_swakv_generate_uses_the_config_else_greedy(tiny_dir, tmp_path, capsys, monkeypatch):
    """`swakv generate` without --temperature samples like the model says; with
    --generation-config none it is greedy."""
    from swakv import cli
    from swakv.engine.llm import LLM

    seen: list[SamplingParams] = []
    real_stream = LLM.stream
    monkeypatch.setattr(LLM, "stream", lambda self, prompt, params=None: (
        seen.append(params) or real_stream(self, prompt, params)))
    flags = ["--model", str(tiny_dir), "--kv-memory", "8MiB", "--page-size", "4",
             "--max-tokens", "3"]
    assert cli.main(["generate", "hi", *flags]) == 0
    assert cli.main(["generate", "hi", *flags, "--generation-config", "none"]) == 0
    assert cli.main(["generate", "hi", *flags, "--temperature", "0.9"]) == 0
    assert [(p.temperature, p.top_k) for p in seen] == [(0.6, 7), (0.0, 0), (0.9, 7)]
