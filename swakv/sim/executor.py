"""Executors that replace the forward pass: a simulated clock, a timing wrapper.

`SimExecutor` is what `swakv simulate` hands to `EngineCore` instead of the model: the
scheduler, the radix cache, the allocators and the engine's bookkeeping run unchanged;
only `execute` differs. It advances a `SimClock` by the step time model and returns
one token per sampling item. Tokens are a deterministic function of the request's
prompt and the output index, so two requests with the same prompt produce the same
outputs (as greedy decoding does) and their cached outputs deduplicate alike.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from swakv.config import ModelSpec
from swakv.engine.executor import ExecuteResult, Executor
from swakv.sched.scheduler import ScheduledItem
from swakv.sim.steptime import StepSample, StepTimeModel, attention_work

FIRST_SIM_TOKEN = 3  # simulated outputs avoid ids 0..2 (pad, eos, bos in Gemma's vocabulary)


@dataclass
class SimClock:
    """Simulated seconds since the start of a run."""

    now: float = 0.0

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"the clock cannot go back ({seconds} s)")
        self.now += seconds


class _NoText:
    def push(self, token_id: int) -> str:
        return ""

    def flush(self) -> str:
        return ""


class TokenOnlyTokenizer:
    """The tokenizer of a simulated engine: requests are token ids and nothing is
    detokenized (there is no vocabulary text), so output text is always empty.
    `eos_ids` is empty: a simulated request ends at its output length."""

    eos_ids: tuple[int, ...] = ()

    def incremental_decoder(self, skip_special_tokens: bool = True) -> _NoText:
        return _NoText()


class StepWork:
    """Per-model constants for `attention_work` of scheduled items."""

    def __init__(self, spec: ModelSpec) -> None:
        self.num_full = len(spec.full_layer_ids)
        self.num_swa = len(spec.swa_layer_ids)
        self.window = spec.window

    def of(self, items: Sequence[ScheduledItem]) -> tuple[int, int]:
        """(tokens, key reads) of one step."""
        tokens = work = 0
        for i in items:
            tokens += i.num_tokens
            work += attention_work(self.num_full, self.num_swa, self.window, i.prefix_len,
                                   i.num_tokens)
        return tokens, work


class SimExecutor:
    """Runs no model: advances `clock` by `step_time` and samples deterministic tokens."""

    def __init__(self, spec: ModelSpec, step_time: StepTimeModel, clock: SimClock | None = None
                 ) -> None:
        self.step_time = step_time
        self.clock = clock or SimClock()
        self.work = StepWork(spec)
        self.vocab_size = spec.vocab_size
        self.num_steps = 0
        self.last_tokens = 0
        self._digests: dict[str, int] = {}  # request id -> digest of its prompt

    def execute(self, items: Sequence[ScheduledItem], sampling: Sequence[int]) -> ExecuteResult:
        tokens, work = self.work.of(items)
        self.clock.advance(self.step_time.seconds(tokens, work))
        self.num_steps += 1
        self.last_tokens = tokens
        return ExecuteResult([self._token(items[k]) for k in sampling])

    def _token(self, item: ScheduledItem) -> int:
        """Output number `num_output_tokens` of the request: a function of (prompt, index)."""
        req = item.req
        digest = self._digests.get(req.request_id)
        if digest is None:
            digest = hash(tuple(req.prompt_ids)) & 0xFFFF_FFFF_FFFF
            self._digests[req.request_id] = digest
        span = self.vocab_size - FIRST_SIM_TOKEN
        return FIRST_SIM_TOKEN + (digest * 1_000_003 + req.num_output_tokens * 7_919) % span

    def forget(self, request_id: str) -> None:
        """Drop a finished request's prompt digest."""
        self._digests.pop(request_id, None)


class ProfilingExecutor:
    """Wraps another executor (the model's) and times each step for `fit_step_time`."""

    def __init__(self, inner: Executor, spec: ModelSpec) -> None:
        self.inner = inner
        self.work = StepWork(spec)
        self.samples: list[StepSample] = []

    def execute(self, items: Sequence[ScheduledItem], sampling: Sequence[int]) -> ExecuteResult:
        tokens, work = self.work.of(items)
        t0 = time.perf_counter()
        result = self.inner.execute(items, sampling)
        self.samples.append(StepSample(tokens, work, time.perf_counter() - t0))
        return result
