"""Batch -> forward: turns a list of extends and decodes into one model call.

Contract with the engine (what must hold before `forward`):
- item i covers positions [prefix_len, prefix_len + n) of request row `row`, with
  n = len(input_ids) >= 1 (n == 1 is a decode);
- `req_table.slots[row, 0 : prefix_len + n]` holds full slots for all those
  positions (the engine allocated [prefix_len, prefix_len + n) and wrote the row);
- KV for positions [0, prefix_len) is already in the pools: full KV for all of them,
  SWA KV (mapped pages) at least for (prefix_len - W, prefix_len) - sliding layers
  read nothing older;
- the new positions' pages are SWA-mapped (alloc_extend / alloc_decode do that).
`forward` writes every layer's K/V for the new positions and returns logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from swakv.memory.kv_pool import KVPool
from swakv.memory.req_table import ReqTable
from swakv.model.attention import EXTEND_BLOCK, AttentionMetadata, build_attention_metadata
from swakv.model.gemma3 import Gemma3Model


@dataclass(frozen=True)
class BatchItem:
    """New tokens `input_ids` at positions [prefix_len, prefix_len + n) of `row`."""

    row: int
    prefix_len: int
    input_ids: list[int] | torch.Tensor

    @property
    def num_new(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class ForwardOutput:
    """`last_logits`: [num_items, vocab], logits of each item's last new token (fp32,
    or the model dtype when `forward(..., fp32_logits=False)`); None when the call asked
    for greedy tokens instead.

    `all_logits[i]`: fp32 [n_i, vocab] for every new token of item i (only when
    requested; `last_logits[i]` equals `all_logits[i][-1]`).

    `greedy_token_ids`: int64 [len(greedy_rows)], with `forward(..., greedy_rows=...)`:
    the first maximum of those items' last logits, which are never built.

    With `forward(..., logit_rows=rows)`, `last_logits` holds only those items' rows, in
    the order given; with `rows` empty the LM head is not run and both fields are None.
    """

    last_logits: torch.Tensor | None
    all_logits: list[torch.Tensor] | None
    greedy_token_ids: torch.Tensor | None = None


class ModelRunner:
    """Runs a model over the pools; a plain object with no threads or state per step.

    `validate=True` checks on every forward that sliding layers read only mapped
    SWA pages (costs a few vectorised ops; meant for tests and debugging).
    """

    def __init__(
        self,
        model: Gemma3Model,
        kv_pool: KVPool,
        req_table: ReqTable,
        validate: bool = False,
        extend_block: int = EXTEND_BLOCK,
    ) -> None:
        if tuple(kv_pool.layout.layers) != tuple(model.spec.layers):
            raise ValueError("KV pool layout does not match the model's layers")
        self.model = model
        self.kv_pool = kv_pool
        self.req_table = req_table
        self.validate = validate
        self.extend_block = extend_block
        self.window = model.spec.window
        self._logits_workspace: torch.Tensor | None = None  # [rows, vocab], model dtype

    def build_metadata(self, items: Sequence[BatchItem]) -> AttentionMetadata:
        """Positions, write slots and attention gathers for `items` (once per forward)."""
        for it in items:
            end = it.prefix_len + it.num_new
            if end > self.req_table.max_context:
                raise ValueError(f"row {it.row}: position {end - 1} beyond max_context")
        return build_attention_metadata(
            [(it.row, it.prefix_len, it.num_new) for it in items],
            self.req_table.slots,
            self.kv_pool.allocator,
            self.window,
            block=self.extend_block,
            validate=self.validate,
        )

    def forward(self, items: Sequence[BatchItem], return_all_logits: bool = False,
                fp32_logits: bool = True, reuse_logits: bool = False,
                greedy_rows: Sequence[int] | None = None,
                logit_rows: Sequence[int] | None = None) -> ForwardOutput:
        """One model step over `items` (in order); see the module docstring for the contract.

        `reuse_logits`: `last_logits` (model dtype) may be a view of a buffer the runner
        reuses, valid only until its next forward; the LM head then writes its output in
        place instead of faulting in a fresh [items, vocab] tensor every step.
        `greedy_rows` (indices into `items`, in order): return only `greedy_token_ids`,
        the greedy token after the last new token of each of those items, with the LM
        head run on those rows alone and no logits kept (`Gemma3Model.greedy_tokens`).
        `logit_rows` (indices into `items`, in order; None: every item): the items whose
        last logits are built; a step in which no item samples passes () and skips the
        LM head. Ignored with `return_all_logits`."""
        with torch.inference_mode():
            hidden = self._hidden(items)
            lens = [it.num_new for it in items]
            if return_all_logits:
                logits = self.model.compute_logits(hidden)
                parts = list(logits.split(lens))
                last = torch.stack([p[-1] for p in parts])
                return ForwardOutput(last, parts)
            rows = greedy_rows if greedy_rows is not None else logit_rows
            if rows is not None and len(rows) == 0:
                empty = torch.empty(0, dtype=torch.int64) if greedy_rows is not None else None
                return ForwardOutput(None, None, empty)
            if rows is not None and list(rows) != list(range(len(lens))):
                hidden = hidden[(torch.tensor(lens).cumsum(0) - 1)[list(rows)]]
            elif len(lens) != hidden.shape[0]:
                hidden = hidden[torch.tensor(lens).cumsum(0) - 1]
            if greedy_rows is not None:
                return ForwardOutput(None, None, self.model.greedy_tokens(hidden))
            out = self._logits_out(hidden) if reuse_logits else None
            return ForwardOutput(self.model.compute_logits(hidden, fp32_logits, out), None)

    def _hidden(self, items: Sequence[BatchItem]) -> torch.Tensor:
        """The final hidden states [total new tokens, hidden] of one step over `items`."""
        meta = self.build_metadata(items)
        return self.model.forward(_flat_ids(items), meta, self.kv_pool)

    def _logits_out(self, hidden: torch.Tensor) -> torch.Tensor:
        """The first rows of the logits workspace (grown in powers of two rows)."""
        rows, vocab = hidden.shape[0], self.model.spec.vocab_size
        ws = self._logits_workspace
        if ws is None or ws.shape[0] < rows or ws.dtype != hidden.dtype or ws.device != hidden.device:
            ws = self._logits_workspace = hidden.new_empty(1 << (rows - 1).bit_length(), vocab)
        return ws[:rows]


def _flat_ids(items: Sequence[BatchItem]) -> torch.Tensor:
    """All items' new token ids concatenated, int64 [T]."""
    if all(isinstance(it.input_ids, list) for it in items):
        flat: list[int] = []
        for it in items:
            flat.extend(it.input_ids)  # type: ignore[arg-type]
        return torch.tensor(flat, dtype=torch.int64)
    return torch.cat([torch.as_tensor(it.input_ids, dtype=torch.int64).reshape(-1) for it in items])
