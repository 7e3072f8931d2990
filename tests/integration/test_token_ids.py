"""`return_token_ids` (vLLM's extension) through the official `openai` client against a
real `swakv serve` process on the tiny model, streaming and not, both endpoints; and
/tokenize -> /detokenize on the same server.

The tiny tokenizer (vocab 128) has one piece per ASCII character and no byte
fallback, so decoding the returned ids must give exactly the returned text."""

from __future__ import annotations

import httpx
import pytest

from swakv.server.testing import ServerProcess, openai_client

SERVE_ARGS = ["--page-size", "4", "--kv-memory", "16MiB", "--num-threads", "1",
              "--served-model-name", "tiny"]
IDS = {"return_token_ids": True, "ignore_eos": True}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from swakv.model.testing import make_tiny_gemma3_dir

    path = tmp_path_factory.mktemp("tiny-token-ids")
    make_tiny_gemma3_dir(path, num_layers=3, window=8, vocab=128, seed=4)
    return path


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    from swakv.model.tokenizer import load_tokenizer

    return load_tokenizer(tiny_dir)


@pytest.fixture(scope="module")
def server(tiny_dir):
    with ServerProcess.start([str(tiny_dir), *SERVE_ARGS]) as proc:  # MODEL as the first argument
        yield proc


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


def extra(obj, name: str):
    return (obj.model_extra or {}).get(name)


def test_completion_returns_prompt_and_output_ids(client, tokenizer):
    out = client.completions.create(model="tiny", prompt=["Hello there", "abc"], max_tokens=9,
                                    temperature=0, n=2, extra_body=IDS)
    assert len(out.choices) == 4
    for c in out.choices:
        prompt = ["Hello there", "abc"][c.index // 2]
        assert extra(c, "prompt_token_ids") == tokenizer.encode(prompt)
        ids = extra(c, "token_ids")
        assert len(ids) == 9
        assert tokenizer.decode(ids) == c.text
    assert out.usage.completion_tokens == 4 * 9


def test_completion_stream_carries_ids_per_chunk(client, tokenizer):
    stream = client.completions.create(model="tiny", prompt="Stream me", max_tokens=12, n=2,
                                       temperature=1.0, seed=5, stream=True, extra_body=IDS)
    ids: dict[int, list[int]] = {0: [], 1: []}
    text = {0: "", 1: ""}
    prompt_ids: dict[int, list] = {0: [], 1: []}
    for chunk in stream:
        for c in chunk.choices:
            ids[c.index] += extra(c, "token_ids")
            text[c.index] += c.text
            if extra(c, "prompt_token_ids") is not None:
                prompt_ids[c.index].append(extra(c, "prompt_token_ids"))
    for i in (0, 1):
        assert len(ids[i]) == 12
        assert tokenizer.decode(ids[i]) == text[i]
        assert prompt_ids[i] == [tokenizer.encode("Stream me")]  # once, on the first chunk


def test_chat_returns_ids_streaming_and_not(client, tokenizer):
    from swakv.engine.build import chat_prompt_ids

    messages = [{"role": "user", "content": "Say something."}]
    expected_prompt = chat_prompt_ids(tokenizer, messages)
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10,
                                         temperature=0, extra_body=IDS)
    assert extra(out, "prompt_token_ids") == expected_prompt
    ids = extra(out.choices[0], "token_ids")
    assert len(ids) == 10 and tokenizer.decode(ids) == out.choices[0].message.content

    chunks = list(client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=10, temperature=0, stream=True,
        extra_body=IDS))
    assert extra(chunks[0], "prompt_token_ids") == expected_prompt
    assert all(extra(c, "prompt_token_ids") is None for c in chunks[1:])
    streamed = [t for c in chunks for ch in c.choices for t in (extra(ch, "token_ids") or [])]
    assert streamed == ids
    assert "".join(ch.delta.content or "" for c in chunks for ch in c.choices) == \
        out.choices[0].message.content


def test_no_ids_unless_asked(client):
    out = client.completions.create(model="tiny", prompt="abc", max_tokens=3, temperature=0)
    assert extra(out.choices[0], "token_ids") is None
    assert extra(out.choices[0], "prompt_token_ids") is None
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user",
                                                                   "content": "x"}],
                                          max_tokens=2, temperature=0)
    assert extra(chat, "prompt_token_ids") is None


def test_tokenize_detokenize_round_trip_and_chat_ids(server, tokenizer, client):
    text = "Round trip: 1, 2, 3!"
    r = httpx.post(server.url + "/tokenize", json={"model": "tiny", "prompt": text,
                                                   "add_special_tokens": False})
    assert r.status_code == 200
    body = r.json()
    assert body["tokens"] == tokenizer.encode(text, add_bos=False)
    assert body["count"] == len(text) and body["token_strs"] is None
    assert httpx.post(server.url + "/detokenize",
                      json={"tokens": body["tokens"]}).json() == {"prompt": text}
    with_bos = httpx.post(server.url + "/tokenize", json={"prompt": text}).json()["tokens"]
    assert httpx.post(server.url + "/detokenize",
                      json={"tokens": with_bos}).json() == {"prompt": "<bos>" + text}

    messages = [{"role": "user", "content": "hi"}]
    chat_tokens = httpx.post(server.url + "/tokenize", json={"messages": messages}).json()
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=1,
                                         extra_body=IDS)
    assert chat_tokens["tokens"] == extra(out, "prompt_token_ids")
