"""The real `swakv serve` process on the tiny random Gemma 3, driven by the openai client."""

from __future__ import annotations

import threading

import pytest

from swakv.server.testing import ServerProcess, openai_client

PAGE = 4
SERVE_ARGS = ["--page-size", str(PAGE), "--kv-memory", "16MiB", "--chunk-size", "64",
              "--decode-reserve", "32", "--frontier-stride", "4", "--num-threads", "1"]
ENGINE_SETTINGS = dict(page_size=PAGE, kv_memory=16 << 20, chunk_size=64, decode_reserve=32,
                       frontier_stride=4, num_threads=1)
GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from swakv.model.testing import make_tiny_gemma3_dir

    path = tmp_path_factory.mktemp("tiny-openai")
    make_tiny_gemma3_dir(path, num_layers=4, window=8, vocab=128, seed=3)
    return path


@pytest.fixture(scope="module")
def server(tiny_dir):
    with ServerProcess.start(["--model", str(tiny_dir), "--served-model-name", "tiny",
                                    *SERVE_ARGS]) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


@pytest.fixture(scope="module")
def llm(tiny_dir):
    import swakv

    return swakv.LLM(str(tiny_dir), **ENGINE_SETTINGS)


def test_models(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["tiny"]


def test_text_completion_matches_in_process(client, llm):
    from swakv.sampling_params import SamplingParams

    prompt = "The quick brown fox"
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, **GREEDY)
    ref = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    choice = out.choices[0]
    assert choice.text == ref.text
    assert choice.finish_reason == "length"
    assert out.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert out.usage.completion_tokens == 12
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert out.object == "text_completion" and out.model == "tiny"


def test_chat_completion_and_stream_agree(client, llm):
    from swakv.sampling_params import SamplingParams

    messages = [{"role": "user", "content": "Say something."}]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10,
                                         **GREEDY)
    ref = llm.chat(messages, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0]
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == ref.text
    assert out.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert out.usage.completion_tokens == 10

    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10,
                                            stream=True, stream_options={"include_usage": True},
                                            **GREEDY)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and
              c.choices[0].finish_reason]
    assert finals == ["length"]
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens == 10
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens <= usage.prompt_tokens


def test_completion_stream(client):
    full = client.completions.create(model="tiny", prompt="abc", max_tokens=9, **GREEDY)
    stream = client.completions.create(model="tiny", prompt="abc", max_tokens=9, stream=True,
                                       **GREEDY)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_n2_seeded_and_usage(client):
    kw = dict(model="tiny", prompt="Hello", max_tokens=8, n=2, temperature=1.0, seed=11,
              extra_body={"ignore_eos": True})
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # reproducible
    assert a.choices[0].text != a.choices[1].text  # distinct derived seeds
    assert a.usage.completion_tokens == 16
    assert a.usage.total_tokens == a.usage.prompt_tokens + 16

    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5, n=2,
        stream=True, temperature=1.0, seed=3, extra_body={"ignore_eos": True})
    texts = {0: "", 1: ""}
    done = set()
    for c in stream:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                done.add(ch.index)
    assert done == {0, 1}


def test_stop_strings(client):
    base = client.completions.create(model="tiny", prompt="Stop me", max_tokens=24, **GREEDY)
    text = base.choices[0].text
    stop = text[6:8]
    assert len(stop) == 2
    expected = text[: text.find(stop)]
    for stop_arg in (stop, [stop, "\x00never"]):
        out = client.completions.create(model="tiny", prompt="Stop me", max_tokens=24,
                                        stop=stop_arg, **GREEDY)
        assert out.choices[0].text == expected
        assert out.choices[0].finish_reason == "stop"
        streamed = client.completions.create(model="tiny", prompt="Stop me", max_tokens=24,
                                             stop=stop_arg, stream=True, **GREEDY)
        assert "".join(c.choices[0].text for c in streamed) == expected


def test_max_completion_tokens_and_cached_tokens(client):
    prompt = "A fairly long prompt that spans several pages of the cache. " * 3
    messages = [{"role": "user", "content": prompt}]
    first = client.chat.completions.create(model="tiny", messages=messages,
                                           max_completion_tokens=3, **GREEDY)
    second = client.chat.completions.create(model="tiny", messages=messages,
                                            max_completion_tokens=3, **GREEDY)
    assert first.usage.completion_tokens == second.usage.completion_tokens == 3
    assert first.choices[0].finish_reason == "length"
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert PAGE <= cached <= second.usage.prompt_tokens


def test_logprobs(client):
    out = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=4, logprobs=True,
        top_logprobs=2, **GREEDY)
    content = out.choices[0].logprobs.content
    assert len(content) == 4
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    # greedy: the chosen token is the most likely one
    assert all(abs(t.logprob - t.top_logprobs[0].logprob) < 1e-5 for t in content)
    text = client.completions.create(model="tiny", prompt="x", max_tokens=3, logprobs=1,
                                     **GREEDY)
    lp = text.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3


def test_eight_concurrent_streams_equal_greedy_in_process(client, llm):
    from swakv.sampling_params import SamplingParams

    prompts = [f"Request number {i}: " + "xyz" * i for i in range(8)]
    refs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            stream = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=20,
                                               stream=True, **GREEDY)
            results[i] = "".join(c.choices[0].text for c in stream)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert [results[i] for i in range(8)] == [r.text for r in refs]
