"""A request: token cursors and a lifecycle; its phase is derived, never stored.

Token layout of `token_ids` (prompt then outputs):
    [0, num_prompt_tokens)              prompt
    [num_prompt_tokens, len(token_ids)) outputs sampled so far
KV cursors live in `kv` (a ReqKV): [0, kv.kv_len) have KV written, and while
decoding kv_len == len(token_ids) - 1 (the last sampled token is the next input).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from enum import StrEnum

import torch

from swakv.cache.req_kv import ReqKV
from swakv.sampling_params import SamplingParams

_ids = itertools.count()


class Lifecycle(StrEnum):
    WAITING = "waiting"
    RUNNING = "running"
    RETRACTED = "retracted"  # waiting again after its KV was freed; outputs kept
    FINISHED = "finished"


class FinishReason(StrEnum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    ERROR = "error"  # failed (a step raised, or it could never be scheduled); see `error`


@dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    max_context: int  # prompt + outputs may not exceed this
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    token_ids: list[int] = field(default_factory=list)
    lifecycle: Lifecycle = Lifecycle.WAITING
    finish_reason: FinishReason | None = None
    stop_text: str | None = None  # the stop string or token text that ended it
    kv: ReqKV | None = None  # set while the request holds a row
    generator: torch.Generator | None = None  # set by the engine for seeded requests
    cached_prompt_tokens: int = 0  # prefix-cache hit at first admission
    num_retractions: int = 0
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finish_time: float | None = None
    output_logprobs: list = field(default_factory=list)
    error: str | None = None  # why it failed, when finish_reason is ERROR

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_ids)

    # ---- cursors --------------------------------------------------------------------
    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_ids) :]

    @property
    def num_computed_tokens(self) -> int:
        return self.kv.kv_len if self.kv is not None else 0

    @property
    def num_tokens_to_compute(self) -> int:
        """Tokens whose KV is still missing before the next sample: prompt chunks or 1."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_prefilling(self) -> bool:
        """More than one token to compute: (re)prefill of prompt (+ kept outputs)."""
        return self.num_tokens_to_compute > 1

    @property
    def is_finished(self) -> bool:
        return self.lifecycle is Lifecycle.FINISHED

    @property
    def max_new_tokens(self) -> int:
        """Output tokens this request may still produce."""
        cap = min(self.params.max_tokens, self.max_context - self.num_prompt_tokens)
        return max(0, cap - self.num_output_tokens)
