"""POST /tokenize and /detokenize in-process (FastAPI TestClient) on a tiny model whose
tokenizer has byte fallback (vocab 384), so any UTF-8 text round-trips."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from swakv.config import EngineConfig, ServerConfig
from swakv.engine.build import build_engine, chat_prompt_ids
from swakv.sched.sizing import PoolSizes
from swakv.server.app import create_app
from swakv.server.async_engine import AsyncEngine
from swakv.server.metrics import ServerMetrics

MULTILINGUAL = "Grüße, 世界! Привет, мир. مرحبا 🙂 naïve café"


@pytest.fixture(scope="module")
def core(tmp_path_factory):
    from swakv.model.testing import make_tiny_gemma3_dir

    path = tmp_path_factory.mktemp("tiny_tokenize")
    make_tiny_gemma3_dir(path, num_layers=3, window=8, vocab=384, seed=2)
    return build_engine(str(path), EngineConfig(page_size=4), sizes=PoolSizes(64, 64, 4, 0, 0))


def make_client(core, **server) -> TestClient:
    holder: list[AsyncEngine] = []
    metrics = ServerMetrics(lambda: holder[0].snapshot)
    holder.append(AsyncEngine(core, metrics))
    return TestClient(create_app(ServerConfig(served_model_name="tiny", **server), holder[0],
                                 metrics))


@pytest.fixture(scope="module")
def client(core):
    with make_client(core) as c:
        yield c


def test_multilingual_round_trip(client, core):
    r = client.post("/tokenize", json={"prompt": MULTILINGUAL, "add_special_tokens": False,
                                       "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == core.tokenizer.encode(MULTILINGUAL, add_bos=False)
    assert body["count"] == len(body["tokens"]) > len(MULTILINGUAL)  # multi-byte pieces
    assert body["max_model_len"] == core.max_context
    assert body["token_strs"] == [core.tokenizer.id_to_token(t) for t in body["tokens"]]
    assert body["token_strs"][:3] == ["G", "r", "<0xC3>"]
    back = client.post("/detokenize", json={"tokens": body["tokens"], "model": "tiny"})
    assert back.status_code == 200 and back.json() == {"prompt": MULTILINGUAL}


def test_special_tokens_stay_in_detokenized_text(client, core):
    ids = client.post("/tokenize", json={"prompt": "hi"}).json()["tokens"]
    assert ids[0] == core.tokenizer.bos_id
    assert client.post("/detokenize", json={"tokens": ids}).json() == {"prompt": "<bos>hi"}


def test_chat_tokenize_is_what_chat_completions_feeds(client, core):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    with_prompt = client.post("/tokenize", json={"messages": messages}).json()["tokens"]
    assert with_prompt == chat_prompt_ids(core.tokenizer, messages)
    without = client.post("/tokenize", json={"messages": messages,
                                             "add_generation_prompt": False}).json()["tokens"]
    suffix = core.tokenizer.encode("<start_of_turn>model\n", add_bos=False)
    assert with_prompt == without + suffix


@pytest.mark.parametrize("path,body,status,param", [
    ("/detokenize", {"tokens": [1, 384]}, 400, "tokens"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("/detokenize", {"tokens": ["1"]}, 400, "tokens.0"),
    ("/tokenize", {"prompt": 5}, 400, "prompt"),
    ("/tokenize", {"prompt": "x", "add_special_tokens": "yes"}, 400, "add_special_tokens"),
    ("/tokenize", {"prompt": "x", "model": "other"}, 404, "model"),
    ("/detokenize", {"tokens": [1], "model": "other"}, 404, "model"),
    ("/tokenize", {"messages": [{"role": "user", "content": "x"}],
                   "continue_final_message": True}, 400, "continue_final_message"),
    ("/tokenize", {"messages": [{"role": "assistant", "content": "x"}, {"role": "assistant",
                                                                      "content": "y"}]},
     400, "messages"),
])
def test_errors_name_the_parameter(client, path, body, status, param):
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


def test_api_key_guards_tokenize(core):
    with make_client(core, api_key="k") as c:
        assert c.post("/tokenize", json={"prompt": "x"}).status_code == 401
        assert c.post("/detokenize", json={"tokens": [1]}).status_code == 401
        ok = c.post("/tokenize", json={"prompt": "x"}, headers={"Authorization": "Bearer k"})
        assert ok.status_code == 200
