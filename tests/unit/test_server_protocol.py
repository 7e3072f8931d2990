"""Request bodies -> SamplingParams and OpenAI errors, without a model or a server."""

from __future__ import annotations

import pytest

from swakv.server.protocol import ApiError, ChatCompletionRequest, CompletionRequest, parse
from swakv.server.routes import _Choice, _max_tokens, usage_of


def chat(**kw):
    return parse(ChatCompletionRequest, {"model": "m", "messages": [
        {"role": "user", "content": "hi"}], **kw})


def test_sampling_params_mapping():
    req = chat(temperature=0.5, top_p=0.9, top_k=5, min_p=0.1, seed=3, stop="x",
               frequency_penalty=0.5, presence_penalty=-0.5, repetition_penalty=1.1,
               min_tokens=1, ignore_eos=True)
    p = req.sampling_params(max_tokens=7, logprobs=None)
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.seed) == (0.5, 0.9, 5, 0.1, 3)
    assert p.stop == ("x",) and p.max_tokens == 7 and p.ignore_eos and p.min_tokens == 1
    assert (p.frequency_penalty, p.presence_penalty, p.repetition_penalty) == (0.5, -0.5, 1.1)


def test_max_completion_tokens_wins():
    assert chat(max_tokens=5, max_completion_tokens=9).requested_max_tokens == 9
    assert chat(max_tokens=5).requested_max_tokens == 5


def test_out_of_range_raises_400_with_param():
    with pytest.raises(ApiError) as e:
        chat(temperature=-0.1).sampling_params(4, None)
    assert e.value.status == 400 and e.value.param == "temperature"
    assert set(e.value.body()["error"]) == {"message", "type", "param", "code"}


def test_validation_errors_name_the_field():
    with pytest.raises(ApiError) as e:
        parse(ChatCompletionRequest, {"model": "m", "messages": [{"role": "bot"}]})
    assert e.value.status == 400 and e.value.param == "messages.0.role"
    with pytest.raises(ApiError):
        parse(CompletionRequest, ["not", "an", "object"])


def test_completion_prompt_forms():
    def prompts(p):
        return parse(CompletionRequest, {"model": "m", "prompt": p}).prompts()

    assert prompts("a") == ["a"]
    assert prompts(["a", "b"]) == ["a", "b"]
    assert prompts([1, 2, 3]) == [[1, 2, 3]]
    assert prompts([[1], [2, 3]]) == [[1], [2, 3]]


def test_text_content_parts_join():
    req = parse(ChatCompletionRequest, {"model": "m", "messages": [
        {"role": "developer", "content": [{"type": "text", "text": "a"},
                                          {"type": "text", "text": "b"}]}]})
    assert req.conversation() == [{"role": "system", "content": "ab"}]


def test_max_tokens_defaults_and_context_check():
    assert _max_tokens(None, None, 10, 100, "max_tokens") == 90  # chat: the rest of the context
    assert _max_tokens(None, 16, 10, 100, "max_tokens") == 16  # completions: 16
    assert _max_tokens(None, 16, 95, 100, "max_tokens") == 5
    with pytest.raises(ApiError) as e:
        _max_tokens(91, None, 10, 100, "max_tokens")
    assert e.value.code == "context_length_exceeded" and "100" in e.value.message


def test_usage_counts_each_prompt_once():
    choices = [_Choice(prompt_tokens=10, completion_tokens=3, cached_tokens=4),
               _Choice(prompt_tokens=10, completion_tokens=5, cached_tokens=0),
               _Choice(prompt_tokens=7, completion_tokens=1, cached_tokens=4),
               _Choice(prompt_tokens=7, completion_tokens=2, cached_tokens=4)]
    u = usage_of(choices, n=2)
    assert u == {"prompt_tokens": 17, "completion_tokens": 11, "total_tokens": 28,
                 "prompt_tokens_details": {"cached_tokens": 4}}
