"""OpenAI request bodies, the error type, and their mapping to SamplingParams.

Only what the engine can honour is accepted: unsupported features (tools, logit_bias,
echo, ...) are refused with a 400 naming the parameter, never silently ignored.
Unknown extra fields are ignored, like the OpenAI API does for forward compatibility.
Types are strict: a boolean must be `true`/`false` (not "yes" or 1), an integer an
integer (not "3" or true), a number an integer or a float (not a string).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from swakv.model.generation_config import GenerationConfig
from swakv.sampling_params import InvalidSamplingParams, SamplingParams

MAX_SEED = 2**63 - 1
MAX_STOP_SEQUENCES = 4  # OpenAI's limit for `stop`
MAX_STOP_TOKEN_IDS = 64


class ApiError(Exception):
    """An error the client caused (or a server state it must see), in OpenAI's format.

    The body is `{"error": {"message", "type", "param", "code"}}`.
    """

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type, param, code)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _is_union_tag(part: Any) -> bool:
    """Pydantic names the member of a union (`str | list[int]`) a value failed as a
    location part: "str", "list[int]", "list[dict[str,any]]"; no field is so named."""
    return isinstance(part, str) and (part in _SCALAR_TAGS or "[" in part)


_SCALAR_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict"})


def from_validation_error(err: ValidationError) -> ApiError:
    """A 400 for the first error. A value that fits no member of a union field gets the
    field as `param` and the members' names, not the first member's complaint
    (`prompt: [1.5]` is "must be one of str, list[str], list[int], list[list[int]]",
    not "prompt.str: Input should be a valid string")."""
    errors = err.errors()
    loc = list(errors[0].get("loc", ()))
    cut = next((i for i, part in enumerate(loc) if _is_union_tag(part)), None)
    if cut is not None:
        param = ".".join(str(p) for p in loc[:cut])
        tags = list(dict.fromkeys(
            str(e["loc"][cut]) for e in errors
            if list(e.get("loc", ()))[:cut] == loc[:cut] and len(e["loc"]) > cut))
        return bad_request(f"{param}: must be one of {', '.join(tags)}", param or None)
    param = ".".join(str(p) for p in loc) or None
    return bad_request(f"{param}: {errors[0].get('msg')}" if param else str(errors[0].get("msg")),
                       param)


STRICT = ConfigDict(extra="ignore", strict=True)


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = False


class _Common(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions (OpenAI + extensions)."""

    model_config = STRICT

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1)
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: str | list[str] | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # Extensions (vLLM / SGLang names)
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    return_token_ids: bool = False  # vLLM: add prompt_token_ids and each choice's token_ids

    def check_common(self, max_n: int) -> None:
        if self.n > max_n:
            raise bad_request(f"n must be <= {max_n}, got {self.n}", "n")
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOP_SEQUENCES:
            raise bad_request(f"stop: at most {MAX_STOP_SEQUENCES} stop sequences are allowed, "
                              f"got {len(self.stop)}", "stop")
        if self.stop_token_ids and len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise bad_request(f"stop_token_ids: at most {MAX_STOP_TOKEN_IDS} ids are allowed, "
                              f"got {len(self.stop_token_ids)}", "stop_token_ids")
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed when stream is true",
                              "stream_options")
        if self.logit_bias:
            raise bad_request("logit_bias is not supported", "logit_bias", "unsupported")

    def sampling_params(self, max_tokens: int, logprobs: int | None,
                        generation: GenerationConfig | None = None) -> SamplingParams:
        """The engine params of one choice; raises ApiError (400) for out-of-range values.

        Sampling values the request leaves unset come from the model's generation config
        (`generation`), else SamplingParams' defaults (OpenAI's)."""
        given = {
            "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
            "min_p": self.min_p, "seed": self.seed,
            "repetition_penalty": self.repetition_penalty,
            "frequency_penalty": self.frequency_penalty,
            "presence_penalty": self.presence_penalty, "min_tokens": self.min_tokens,
            "stop_token_ids": tuple(self.stop_token_ids) if self.stop_token_ids else None,
        }
        kwargs = (generation or GenerationConfig()).apply(given)
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        try:
            return SamplingParams(max_tokens=max_tokens, stop=stop, ignore_eos=self.ignore_eos,
                                  logprobs=logprobs, **kwargs)
        except InvalidSamplingParams as e:
            message = str(e)
            raise bad_request(message, message.split(" ", 1)[0]) from None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def check(self, max_n: int) -> None:
        self.check_common(max_n)
        if self.echo:
            raise bad_request("echo is not supported", "echo", "unsupported")
        if self.suffix:
            raise bad_request("suffix is not supported", "suffix", "unsupported")
        if self.best_of is not None and self.best_of != self.n:
            raise bad_request("best_of other than n is not supported", "best_of", "unsupported")

    def prompts(self) -> list[str | list[int]]:
        """The prompts of this request: one string or token list each."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise bad_request("prompt must not be empty", "prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class ChatMessage(BaseModel):
    model_config = STRICT

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self, index: int) -> str:
        """The message's text; only an assistant message may have no content (null)."""
        if self.content is None:
            if self.role != "assistant":
                raise bad_request(f"messages.{index}.content: a {self.role} message needs "
                                  "content (a string or text parts), got null",
                                  f"messages.{index}.content")
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request("only text content parts are supported",
                                  f"messages.{index}.content", "unsupported")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def check(self, max_n: int) -> None:
        self.check_common(max_n)
        for name in ("tools", "functions"):
            if getattr(self, name):
                raise bad_request(f"{name} are not supported", name, "unsupported")
        if self.tool_choice not in (None, "none"):
            raise bad_request("tool_choice is not supported", "tool_choice", "unsupported")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise bad_request("only response_format type 'text' is supported",
                              "response_format", "unsupported")
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")

    def conversation(self) -> list[dict[str, str]]:
        """Messages as the chat template expects them ('developer' is a system message)."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text(i)}
                for i, m in enumerate(self.messages)]

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


def parse(model: type[BaseModel], body: Any) -> Any:
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise from_validation_error(e) from None
