"""Termination and output text of one request: stop tokens, stop strings, lengths.

Text is detokenized incrementally; a stop string ends the output just before it and
is never emitted. Streamed deltas hold back the last `max_stop_len - 1` characters
(a stop string may still be completing there) and any text ending in a partial
multi-byte character (the tokenizer yields U+FFFD until the character is complete).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from swakv.sampling_params import SamplingParams
from swakv.sched.request import FinishReason


@dataclass
class OutputText:
    """Incremental text of one request's outputs.

    `text` is everything decoded so far (stop string excluded once found);
    `[0, num_emitted)` of it has been handed out as deltas.
    """

    tokenizer: object  # swakv.model.tokenizer.Tokenizer
    params: SamplingParams
    eos_ids: frozenset[int]
    text: str = ""
    num_emitted: int = 0
    _decoder: object = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._decoder = self.tokenizer.incremental_decoder()

    def add_token(self, token_id: int, num_output_tokens: int, max_new_reached: bool
                  ) -> FinishReason | None:
        """Account one sampled token; returns why the request stops, if it does."""
        p = self.params
        can_stop = num_output_tokens >= p.min_tokens
        stop_token = can_stop and (token_id in p.stop_token_ids
                                   or (not p.ignore_eos and token_id in self.eos_ids))
        old_len = len(self.text)
        if not stop_token:
            self.text += self._decoder.push(token_id)
        if stop_token or max_new_reached:  # the request ends: text held back is released
            self.text += self._decoder.flush()
        if p.stop and can_stop:
            longest = max(len(s) for s in p.stop)
            start = max(0, old_len - longest + 1)
            hits = [i for i in (self.text.find(s, start) for s in p.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                return FinishReason.STOP
        if stop_token:
            return FinishReason.STOP
        return FinishReason.LENGTH if max_new_reached else None

    def take_delta(self, finished: bool) -> str:
        """Text not handed out yet that can no longer become part of a stop string."""
        end = len(self.text)
        if not finished and self.params.stop:
            end = max(self.num_emitted, end - (max(len(s) for s in self.params.stop) - 1))
        delta = self.text[self.num_emitted : end]
        self.num_emitted = end
        return delta
