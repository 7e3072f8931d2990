"""Per-app server state and the request guards every /v1 handler runs first.

Guard order (first failure wins): API key (401), body size (413), JSON (400),
model name (404), parameters (400).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Request

from swakv.config import ServerConfig
from swakv.engine.build import chat_prompt_ids
from swakv.model.generation_config import GenerationConfig
from swakv.model.loader import DEFAULT_MODEL_ALIASES
from swakv.server.async_engine import AsyncEngine
from swakv.server.metrics import ServerMetrics
from swakv.server.protocol import ApiError, bad_request

DEFAULT_MODEL_ID = "gemma3-270m"


def model_id_for(cfg: ServerConfig) -> str:
    """The id /v1/models lists: --served-model-name, else derived from --model."""
    if cfg.served_model_name:
        return cfg.served_model_name
    if cfg.model in DEFAULT_MODEL_ALIASES:
        return DEFAULT_MODEL_ID
    path = Path(cfg.model)
    return path.stem if path.suffix == ".gguf" else (path.name or str(path))


@dataclass
class ServerState:
    config: ServerConfig
    engine: AsyncEngine
    metrics: ServerMetrics
    model_id: str
    created: int
    generation: GenerationConfig = field(default_factory=GenerationConfig)  # request defaults

    @property
    def model_names(self) -> set[str]:
        """Names a request may use for the served model: its id and the --model value."""
        return {self.model_id, self.config.model}

    def check_model(self, name: str) -> None:
        if name not in self.model_names:
            raise ApiError(404, f"The model `{name}` does not exist. This server serves "
                           f"`{self.model_id}`.", param="model", code="model_not_found")

    def chat_prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        return chat_prompt_ids(self.engine.tokenizer, messages)

    @property
    def supports_logprobs(self) -> bool:
        """Whether the engine's sampler returns logprobs (SamplingParams.logprobs)."""
        return self.engine.supports_logprobs

    def format_logprobs(self, chat: bool) -> Callable[[list], Any]:
        from swakv.server.logprobs import formatter

        return formatter(self.engine.tokenizer, chat)


def authorize(request: Request, state: ServerState) -> None:
    key = state.config.api_key
    if key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(),
                                                                key.encode()):
        message = ("Missing API key: send 'Authorization: Bearer KEY'." if not header
                   else "Incorrect API key provided.")
        raise ApiError(401, message, code="invalid_api_key")


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"request body is larger than {limit} bytes", code="request_too_large")


async def read_json(request: Request, limit: int) -> Any:
    """The parsed JSON body; 413 past `limit` bytes (checked before reading when the
    client sends Content-Length), 400 if it is not JSON."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise bad_request("request body is empty; expected a JSON object", code="invalid_json")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"request body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:
        raise bad_request("request body is nested too deeply", code="invalid_json") from None
