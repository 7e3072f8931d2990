"""The OpenAI endpoints: request -> engine requests -> JSON body or SSE stream.

One HTTP request with P prompts and n choices becomes P*n independent engine
requests (choice index = prompt * n + j). With a seed, choice j samples with
seed + j so that choices differ but the whole response is reproducible.

Usage: prompt_tokens counts each prompt once (not once per choice, like OpenAI);
completion_tokens sums every choice; cached_tokens counts, per prompt, the prefix
tokens every one of its choices found in the cache.

`return_token_ids: true` (vLLM's extension) adds token ids in vLLM's places:
completions put `prompt_token_ids` and `token_ids` on each choice; chat puts
`prompt_token_ids` on the response and `token_ids` on each choice. Streaming: each
chunk's choice carries the `token_ids` it adds (a chunk is sent for new ids even
when their text is still held back), and `prompt_token_ids` comes once, on a
choice's first chunk (completions) or the first chunk of the response (chat).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from swakv.engine.core import InvalidRequest, PromptTooLong
from swakv.model.tokenizer import ChatTemplateError
from swakv.server.async_engine import Delta, EngineUnavailable, RequestFailed, RequestGroup
from swakv.server.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    bad_request,
    parse,
)
from swakv.server.state import ServerState, authorize, read_json

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def engine_error(e: BaseException, param: str) -> ApiError:
    """The HTTP error for an exception the engine raised for one request."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, PromptTooLong):
        return ApiError(400, str(e), param=param, code="context_length_exceeded")
    if isinstance(e, EngineUnavailable):
        return ApiError(503, str(e), type="server_error", code="engine_unavailable")
    if isinstance(e, RequestFailed):
        return ApiError(500, str(e), type="server_error", code="internal_error")
    if isinstance(e, InvalidRequest):
        return bad_request(str(e), param if e.param == "prompt" else e.param)
    if isinstance(e, ValueError):
        return bad_request(str(e), param)
    return ApiError(500, f"internal error: {e}", type="server_error", code="internal_error")


@dataclass
class _Choice:
    prompt_token_ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


def usage_of(choices: list[_Choice], n: int) -> dict[str, Any]:
    prompts = [choices[i : i + n] for i in range(0, len(choices), n)]
    prompt_tokens = sum(group[0].prompt_tokens for group in prompts)
    completion = sum(c.completion_tokens for c in choices)
    cached = sum(min(c.cached_tokens for c in group) for group in prompts)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


class _Format:
    """Response shapes of one endpoint (chat or text completion)."""

    def __init__(self, chat: bool, rid: str, model: str, token_ids: bool = False) -> None:
        self.chat, self.id, self.model, self.created = chat, rid, model, int(time.time())
        self.token_ids = token_ids  # return_token_ids

    def _envelope(self, chunk: bool) -> dict[str, Any]:
        obj = ("chat.completion" if self.chat else "text_completion") + (
            ".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def chunk(self, index: int, text: str | None, finish_reason: str | None,
              logprobs: Any = None, role: bool = False, token_ids: list[int] | None = None,
              prompt_token_ids: list[int] | None = None) -> dict[str, Any]:
        """One SSE chunk of choice `index`; `token_ids` / `prompt_token_ids` are added
        only when return_token_ids is on and they are given."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "logprobs": logprobs,
                      "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": text or "", "logprobs": logprobs,
                      "finish_reason": finish_reason}
        out = {**self._envelope(True), "choices": [choice]}
        if self.token_ids and token_ids is not None:
            choice["token_ids"] = token_ids
        if self.token_ids and prompt_token_ids is not None:
            (out if self.chat else choice)["prompt_token_ids"] = prompt_token_ids
        return out

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        return {**self._envelope(True), "choices": [], "usage": usage}

    def body(self, choices: list[_Choice], n: int,
             logprobs: Callable[[list], Any] | None) -> dict[str, Any]:
        out = []
        for i, c in enumerate(choices):
            lp = logprobs(c.logprobs, i) if logprobs else None
            text = "".join(c.text)
            if self.chat:
                choice = {"index": i, "message": {"role": "assistant", "content": text},
                          "logprobs": lp, "finish_reason": c.finish_reason}
            else:
                choice = {"index": i, "text": text, "logprobs": lp,
                          "finish_reason": c.finish_reason}
            if self.token_ids:
                if not self.chat:
                    choice["prompt_token_ids"] = c.prompt_token_ids
                choice["token_ids"] = c.token_ids
            out.append(choice)
        body = {**self._envelope(False), "choices": out, "usage": usage_of(choices, n),
                "system_fingerprint": None}
        if self.token_ids and self.chat:  # chat has one prompt, shared by its n choices
            body["prompt_token_ids"] = choices[0].prompt_token_ids
        return body


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'), ensure_ascii=False)}\n\n"


class SSEResponse(StreamingResponse):
    """A text/event-stream response that runs `on_close` however it ends (client gone too)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


# ---------------------------------------------------------------------------------


def _token_prompt(ids: list[int], vocab: int, param: str) -> list[int]:
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise bad_request(f"token ids out of range [0, {vocab}): {bad[:5]}", param)
    return ids


def _max_tokens(requested: int | None, default: int | None, prompt_len: int,
                max_context: int, param: str) -> int:
    room = max_context - prompt_len
    if room <= 0:  # the prompt alone does not fit: the engine raises PromptTooLong
        return requested or 1
    if requested is None:
        return max(1, min(default or room, room))
    if requested >= 1 and prompt_len + requested > max_context:
        raise ApiError(
            400, f"this model's maximum context length is {max_context} tokens; the prompt has "
            f"{prompt_len} tokens and {param} is {requested} ({prompt_len + requested} in all)",
            param=param, code="context_length_exceeded")
    return requested


async def completions(request: Request) -> Response:
    return await _handle(request, chat=False)


async def chat_completions(request: Request) -> Response:
    return await _handle(request, chat=True)


async def _handle(request: Request, chat: bool) -> Response:
    state: ServerState = request.app.state.swakv
    authorize(request, state)
    body = await read_json(request, state.config.max_request_bytes)
    req = parse(ChatCompletionRequest if chat else CompletionRequest, body)
    state.check_model(req.model)
    req.check(state.config.max_n)
    eng = state.engine
    prompt_param = "messages" if chat else "prompt"
    # Tokenising and templating run off the event loop: a 4 MiB prompt takes seconds
    # and /health (and every stream) must stay responsive meanwhile.
    if chat:
        conversation = req.conversation()
        try:
            prompts = [await asyncio.to_thread(state.chat_prompt_ids, conversation)]
        except ChatTemplateError as e:
            raise bad_request(str(e), "messages") from None
        num_logprobs, requested = req.num_logprobs, req.requested_max_tokens
        default, max_param = None, ("max_completion_tokens" if req.max_completion_tokens
                                    is not None else "max_tokens")
    else:
        prompts = [await asyncio.to_thread(eng.tokenizer.encode, p) if isinstance(p, str)
                   else _token_prompt(p, eng.vocab_size, "prompt") for p in req.prompts()]
        num_logprobs, requested = req.logprobs, req.max_tokens
        default, max_param = COMPLETION_DEFAULT_MAX_TOKENS, "max_tokens"
    if num_logprobs is not None and not state.supports_logprobs:
        raise bad_request("logprobs are not supported by this server yet",
                          "top_logprobs" if chat and req.top_logprobs else "logprobs",
                          "unsupported")
    work = []
    for ids in prompts:
        if not ids:
            raise bad_request("prompt must contain at least one token", prompt_param)
        max_tokens = _max_tokens(requested, default, len(ids), eng.max_context, max_param)
        for j in range(req.n):
            params = req.sampling_params(max_tokens, num_logprobs, state.generation)
            if req.seed is not None and j:
                params = _with_seed(params, (req.seed + j) % (2**63))
            work.append((list(ids), params))
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    try:
        group = eng.submit(rid, work)
        await group.wait_accepted()
    except BaseException as e:
        if isinstance(e, asyncio.CancelledError):
            raise
        raise engine_error(e, prompt_param) from None
    fmt = _Format(chat, rid, state.model_id, req.return_token_ids)
    logprobs_fn = state.format_logprobs(chat) if num_logprobs is not None else None
    choices = [_Choice(prompt_token_ids=ids) for ids, _ in work]
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return SSEResponse(_stream(group, fmt, choices, req.n, include_usage, logprobs_fn),
                           group.close)
    return await _collect(request, group, fmt, choices, req.n, logprobs_fn)


def _with_seed(params, seed: int):
    from dataclasses import replace

    return replace(params, seed=seed)


async def _collect(request: Request, group: RequestGroup, fmt: _Format, choices: list[_Choice],
                   n: int, logprobs_fn) -> Response:

    async def gather() -> None:
        async for d in group.events():
            _add(choices[d.index], d)

    work = asyncio.ensure_future(gather())
    gone = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
        group.close()  # no-op when all finished; aborts the rest if the client left
    if not work.done() or work.cancelled():
        return Response(status_code=499)  # client closed the connection; nobody reads this
    exc = work.exception()
    if exc is not None:
        raise engine_error(exc, "messages" if fmt.chat else "prompt")
    return JSONResponse(fmt.body(choices, n, logprobs_fn))


def _add(choice: _Choice, d: Delta) -> None:
    choice.text.append(d.text)
    choice.token_ids += d.token_ids
    if d.logprobs:
        choice.logprobs += d.logprobs
    _record_finish(choice, d)


def _record_finish(choice: _Choice, d: Delta) -> None:
    """Keep the last delta's finish reason and token counts (all that usage needs)."""
    if d.finish_reason is not None:
        choice.finish_reason = d.finish_reason
        choice.prompt_tokens, choice.completion_tokens, choice.cached_tokens = (
            d.prompt_tokens, d.completion_tokens, d.cached_tokens)


async def _stream(group: RequestGroup, fmt: _Format, choices: list[_Choice], n: int,
                  include_usage: bool, logprobs_fn) -> AsyncIterator[str]:
    # Choices whose prompt_token_ids are still to be sent (return_token_ids only).
    prompt_pending = set(range(len(choices))) if fmt.token_ids else set()
    if fmt.chat:
        for i in range(len(choices)):
            yield _sse(fmt.chunk(i, None, None, role=True, prompt_token_ids=(
                choices[0].prompt_token_ids if i == 0 and fmt.token_ids else None)))
        prompt_pending.clear()
    try:
        async for d in group.events():
            # a stream sends each delta as it comes: only usage needs keeping, not the
            # text, ids and logprobs of a possibly long completion
            _record_finish(choices[d.index], d)
            if (d.text or d.finish_reason is not None or d.logprobs
                    or (fmt.token_ids and d.token_ids)):
                lp = logprobs_fn(d.logprobs, d.index) if logprobs_fn and d.logprobs else None
                prompt_ids = None
                if d.index in prompt_pending:
                    prompt_pending.discard(d.index)
                    prompt_ids = choices[d.index].prompt_token_ids
                yield _sse(fmt.chunk(d.index, d.text, d.finish_reason, lp,
                                     token_ids=d.token_ids, prompt_token_ids=prompt_ids))
    except Exception as e:  # the stream has started: the error goes in an event
        yield _sse(engine_error(e, "messages" if fmt.chat else "prompt").body())
        yield "data: [DONE]\n\n"
        return
    if include_usage:
        yield _sse(fmt.usage_chunk(usage_of(choices, n)))
    yield "data: [DONE]\n\n"
