"""A step-by-step log of an engine's decisions, to compare a simulated engine with a real one.

`record_decisions(core)` wraps the engine's executor (the seam the engine step has for
it) with a recorder of each batch's items; `DecisionLog.end_step` closes a step with
what was retracted and finished, and the scheduler's counters. Two engines fed the
same requests at the same steps (`drive_by_steps`) must produce equal logs if they
share every decision: the same admissions (an admitted item starts at its prefix-cache
hit), chunks, decodes, retractions (which requests, not only how many) and finishes.
`drive_by_steps` checks each engine's integrity after every step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from swakv.engine.executor import ExecuteResult, Executor
from swakv.sampling_params import SamplingParams
from swakv.sched.scheduler import ScheduledItem


@dataclass(frozen=True)
class StepDecisions:
    """One engine step: items `(request id, prefix_len, num_tokens)` in batch order;
    retracted request ids (sorted); finished `(request id, reason, outputs, cached prompt
    tokens)`; cumulative counters."""

    items: tuple[tuple[str, int, int], ...]
    retracted: tuple[str, ...]
    finished: tuple[tuple[str, str, int, int], ...]
    num_retractions: int
    prefix_hit_tokens: int


class DecisionRecorder:
    """Executor wrapper: remembers the items of the batch it last ran."""

    def __init__(self, inner: Executor) -> None:
        self.inner = inner
        self.items: tuple[tuple[str, int, int], ...] = ()

    def execute(self, items: Sequence[ScheduledItem], sampling: Sequence[int]) -> ExecuteResult:
        self.items = tuple((i.req.request_id, i.prefix_len, i.num_tokens) for i in items)
        return self.inner.execute(items, sampling)

    def take(self) -> tuple[tuple[str, int, int], ...]:
        items, self.items = self.items, ()
        return items


@dataclass
class DecisionLog:
    core: object  # the EngineCore being recorded
    recorder: DecisionRecorder
    steps: list[StepDecisions] = field(default_factory=list)
    integrity_checks: int = 0
    _num_retractions: dict[str, int] = field(default_factory=dict)  # request id -> seen

    def end_step(self, outputs) -> None:
        finished = tuple((o.request.request_id, o.request.finish_reason.value,
                          o.request.num_output_tokens, o.request.cached_prompt_tokens)
                         for o in outputs if o.finished)
        retracted = []
        for request_id, req in self.core.requests.items():
            if req.num_retractions != self._num_retractions.get(request_id, 0):
                self._num_retractions[request_id] = req.num_retractions
                retracted.append(request_id)
        c = self.core.scheduler.counters
        self.steps.append(StepDecisions(self.recorder.take(), tuple(sorted(retracted)), finished,
                                        c.num_retractions, c.prefix_hit_tokens))


def record_decisions(core) -> DecisionLog:
    """Start logging `core`'s decisions (wraps `core.executor`)."""
    recorder = DecisionRecorder(core.executor)
    core.executor = recorder
    return DecisionLog(core, recorder)


def drive_by_steps(core, arrivals: Mapping[int, Sequence[tuple[str, list[int], SamplingParams]]],
                   max_steps: int = 100_000) -> DecisionLog:
    """Add `arrivals[k]` (request id, prompt, params) before step k; step until every
    request finished, checking the engine's integrity after every step. Returns the
    decision log."""
    log = record_decisions(core)
    last = max(arrivals, default=0)
    step = 0
    while step <= last or core.has_unfinished():
        for request_id, prompt, params in arrivals.get(step, ()):
            core.add_request(prompt, params, request_id=request_id)
        log.end_step(core.step())
        core.check_integrity()
        log.integrity_checks += 1
        step += 1
        if step > max_steps:
            raise RuntimeError(f"no progress after {max_steps} steps")
    return log
