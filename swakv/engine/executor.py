"""Executors: what turns one scheduled batch into sampled tokens.

The engine step is scheduler -> executor -> engine bookkeeping. Everything that
decides (admission, chunking, retraction, cache commits, stop handling) lives in the
scheduler, the cache facade and `EngineCore`; the executor only runs the batch: the
model executor runs the forward over the KV pools and samples; a simulator swaps in an
executor with a clock and no model (`swakv simulate`), so both share every decision.

Contract of `execute(items, sampling)`: `items[k]` computes positions
`[prefix_len, prefix_len + num_tokens)` of its request (slots already allocated);
`sampling` lists the indices of the items whose last token is sampled, in order.
Returns one token id (and optionally logprobs) per sampling index. KV bookkeeping
(`mark_computed`) is the engine's, after `execute` returns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from swakv.engine.runner import BatchItem, ModelRunner
from swakv.model.sampler import Sampler, plain_greedy
from swakv.sched.request import Request
from swakv.sched.scheduler import ScheduledItem


@dataclass(frozen=True)
class ExecuteResult:
    """`token_ids[j]` for the j-th sampling item; `logprobs[j]` (TokenLogprobs or None)."""

    token_ids: list[int]
    logprobs: list = field(default_factory=list)


class Executor(Protocol):
    def execute(self, items: Sequence[ScheduledItem], sampling: Sequence[int]) -> ExecuteResult: ...


class ModelExecutor:
    """Forward over the pools (`ModelRunner`), then the sampler on the sampled rows."""

    def __init__(self, runner: ModelRunner, sampler: Sampler, eos_ids: frozenset[int]) -> None:
        self.runner = runner
        self.sampler = sampler
        self.eos_ids = eos_ids
        # a batch whose sampled rows are all plain greedy (no penalties, logprobs or
        # banned tokens) takes its tokens from the LM head without logits
        # (`ModelRunner.forward(greedy_rows=...)`: the same tokens); False: the sampler
        self.greedy_fast_path = True

    @torch.inference_mode()
    def execute(self, items: Sequence[ScheduledItem], sampling: Sequence[int]) -> ExecuteResult:
        batch = [BatchItem(i.req.kv.row, i.prefix_len,
                           i.req.token_ids[i.prefix_len : i.prefix_len + i.num_tokens])
                 for i in items]
        if sampling and self.greedy_fast_path and all(
                self._plain_greedy(items[k].req) for k in sampling):
            greedy = self.runner.forward(batch, greedy_rows=sampling).greedy_token_ids
            assert greedy is not None
            return ExecuteResult(greedy.tolist(), [None] * len(sampling))
        if not sampling:  # prefill chunks only: KV is written, no LM head runs
            self.runner.forward(batch, logit_rows=())
            return ExecuteResult([], [])
        # the sampler converts if needed; the logits are consumed before this returns
        out = self.runner.forward(batch, fp32_logits=False, reuse_logits=True,
                                  logit_rows=sampling)
        logits = out.last_logits  # one row per sampling item, in `sampling`'s order
        assert logits is not None
        reqs = [items[k].req for k in sampling]
        self._mask_early_stops(logits, reqs)
        res = self.sampler.sample(
            logits,
            [r.params for r in reqs],
            [r.generator for r in reqs],
            [r.prompt_ids for r in reqs],
            [r.output_ids for r in reqs],
        )
        return ExecuteResult(res.token_ids.tolist(), res.logprobs)

    def _plain_greedy(self, req: Request) -> bool:
        """Whether the sampler would take a plain argmax of this request's logits."""
        p = req.params
        return plain_greedy(p) and not self._banned(req)

    def _banned(self, req: Request) -> list[int]:
        """Token ids this request may not sample yet (before `min_tokens` outputs)."""
        p = req.params
        if req.num_output_tokens >= p.min_tokens:
            return []
        return list(p.stop_token_ids) + ([] if p.ignore_eos else list(self.eos_ids))

    def _mask_early_stops(self, logits: torch.Tensor, reqs: list[Request]) -> None:
        """Before `min_tokens` outputs, EOS and stop tokens cannot be sampled.

        Ids are in range: `EngineCore.validate_request` refused any other at submission.
        """
        for j, req in enumerate(reqs):
            banned = self._banned(req)
            if banned:
                logits[j, banned] = float("-inf")
