"""The in-process API: `swakv.LLM(model=..., **settings)`.

    llm = LLM(page_size=16, kv_memory=2 << 30)
    out = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=8))
    print(out[0].text)

Calls without sampling params use `llm.default_sampling_params()`: the model's
generation config (unless `generation_config="none"`) over SamplingParams' defaults,
like vLLM's `LLM`. Explicit SamplingParams are used exactly as given.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from swakv.config import EngineConfig
from swakv.engine.build import build, chat_prompt_ids
from swakv.engine.core import EngineCore, StepOutput
from swakv.sampling_params import SamplingParams
from swakv.sched.request import Request

Prompt = str | Sequence[int]
Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens served from the prefix cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class GenerationOutput:
    request_id: str
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage
    logprobs: list | None = None
    error: str | None = None  # set when finish_reason is "error" (the request failed)


@dataclass(frozen=True)
class StreamChunk:
    request_id: str
    delta_text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None


def to_output(engine: EngineCore, req: Request) -> GenerationOutput:
    return GenerationOutput(
        request_id=req.request_id,
        prompt_token_ids=list(req.prompt_ids),
        text=engine.output_text(req.request_id),
        token_ids=req.output_ids,
        finish_reason=req.finish_reason.value if req.finish_reason else "",
        usage=Usage(req.num_prompt_tokens, req.num_output_tokens, req.cached_prompt_tokens),
        logprobs=list(req.output_logprobs) if req.params.logprobs is not None else None,
        error=req.error,
    )


class LLM:
    def __init__(self, model: str | None = None, **settings) -> None:
        built = build(model, EngineConfig(**settings))
        self.engine = built.engine
        self.config = self.engine.cfg  # dtype resolved ("auto" -> "bfloat16" / "float32")
        self.generation = built.generation
        self.tokenizer = self.engine.tokenizer

    def default_sampling_params(self, fallback: Mapping[str, Any] | None = None,
                                **given: Any) -> SamplingParams:
        """SamplingParams from `given`, then the model's generation config for the
        sampling values `given` leaves unset (or None), then `fallback`, then
        SamplingParams' own defaults. Raises InvalidSamplingParams."""
        return SamplingParams(**self.generation.apply(given, fallback))

    def encode(self, prompt: Prompt) -> list[int]:
        return self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)

    def chat_prompt(self, messages: Messages) -> list[int]:
        return chat_prompt_ids(self.tokenizer, messages)

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[GenerationOutput]:
        """Run all prompts to completion (batched together) and return outputs in order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params = sampling_params or self.default_sampling_params()
        params_list = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError("need one SamplingParams per prompt")
        return self._run(self._add_all([(self.encode(p), sp)
                                        for p, sp in zip(prompts, params_list)]))

    def chat(self, messages: Messages | Sequence[Messages],
             sampling_params: SamplingParams | None = None) -> list[GenerationOutput]:
        """Apply the model's chat template to each conversation and generate."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        params = sampling_params or self.default_sampling_params()
        return self._run(self._add_all([(self.chat_prompt(m), params) for m in convs]))

    def _add_all(self, work: list[tuple[list[int], SamplingParams]]) -> list[Request]:
        """Validate every request first, then add them all: one bad prompt adds none."""
        for ids, sp in work:
            self.engine.validate_request(ids, sp)
        return [self.engine.add_request(ids, sp) for ids, sp in work]

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None
               ) -> Iterator[StreamChunk]:
        """Yield text deltas of one request as steps produce them."""
        req = self.engine.add_request(self.encode(prompt),
                                      sampling_params or self.default_sampling_params())
        try:
            while not req.is_finished:
                for out in self.engine.step():
                    if out.request is req:
                        yield self._chunk(out)
        finally:
            if not req.is_finished:
                self.engine.abort(req.request_id)
            self.engine.release(req.request_id)

    @staticmethod
    def _chunk(out: StepOutput) -> StreamChunk:
        r = out.request
        return StreamChunk(r.request_id, out.delta_text, out.new_token_ids, out.finished,
                           r.finish_reason.value if out.finished and r.finish_reason else None)

    def _run(self, reqs: list[Request]) -> list[GenerationOutput]:
        try:
            while any(not r.is_finished for r in reqs):
                self.engine.step()
            return [to_output(self.engine, r) for r in reqs]
        finally:
            for r in reqs:
                if not r.is_finished:
                    self.engine.abort(r.request_id)
                self.engine.release(r.request_id)
