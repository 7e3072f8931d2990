"""POST /tokenize and POST /detokenize, in vLLM's shapes.

/tokenize takes either a completion-style body `{"prompt": str, "add_special_tokens":
true}` (BOS first when add_special_tokens) or a chat body `{"messages": [...],
"add_generation_prompt": true}` (exactly the ids /v1/chat/completions would feed the
model), optionally `"return_token_strs": true`, and answers
`{"count", "max_model_len", "tokens", "token_strs"}`. /detokenize takes
`{"tokens": [int]}` and answers `{"prompt": str}`; special tokens are kept in the
text (like vLLM), so tokenize -> detokenize round-trips with add_special_tokens false.
`model` is optional in both; when given it must name the served model (404).
Both need the API key when one is set, and tokenize off the event loop.
"""

from __future__ import annotations

import asyncio

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from swakv.model.tokenizer import ChatTemplateError
from swakv.server.protocol import STRICT, ChatMessage, bad_request, parse
from swakv.server.state import ServerState, authorize, read_json


class TokenizeCompletionRequest(BaseModel):
    model_config = STRICT

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(BaseModel):
    model_config = STRICT

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = STRICT

    model: str | None = None
    tokens: list[int]


def _chat_ids(state: ServerState, req: TokenizeChatRequest) -> list[int]:
    if req.continue_final_message:
        raise bad_request("continue_final_message is not supported", "continue_final_message",
                          "unsupported")
    conversation = [{"role": "system" if m.role == "developer" else m.role, "content": m.text(i)}
                    for i, m in enumerate(req.messages)]
    if req.add_generation_prompt:
        return state.chat_prompt_ids(conversation)
    tok = state.engine.tokenizer
    text = tok.apply_chat_template(conversation, add_generation_prompt=False)
    bos = tok.special_tokens.get("bos_token")
    return tok.encode(text, add_bos=not (bos and text.startswith(bos)))


async def tokenize(request: Request) -> JSONResponse:
    state: ServerState = request.app.state.swakv
    authorize(request, state)
    body = await read_json(request, state.config.max_request_bytes)
    chat = isinstance(body, dict) and "messages" in body
    req = parse(TokenizeChatRequest if chat else TokenizeCompletionRequest, body)
    if req.model is not None:
        state.check_model(req.model)
    tok = state.engine.tokenizer
    try:
        if isinstance(req, TokenizeChatRequest):
            ids = await asyncio.to_thread(_chat_ids, state, req)
        else:
            ids = await asyncio.to_thread(tok.encode, req.prompt, req.add_special_tokens)
    except ChatTemplateError as e:
        raise bad_request(str(e), "messages") from None
    strs = [tok.id_to_token(i) for i in ids] if req.return_token_strs else None
    return JSONResponse({"count": len(ids), "max_model_len": state.engine.max_context,
                         "tokens": ids, "token_strs": strs})


async def detokenize(request: Request) -> JSONResponse:
    state: ServerState = request.app.state.swakv
    authorize(request, state)
    body = await read_json(request, state.config.max_request_bytes)
    req = parse(DetokenizeRequest, body)
    if req.model is not None:
        state.check_model(req.model)
    vocab = state.engine.vocab_size
    bad = [t for t in req.tokens if not 0 <= t < vocab]
    if bad:
        raise bad_request(f"tokens: token ids must be in [0, {vocab}); got {bad[:5]}", "tokens")
    tok = state.engine.tokenizer
    text = await asyncio.to_thread(tok.decode, req.tokens, False)
    return JSONResponse({"prompt": text})
