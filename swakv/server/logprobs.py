"""OpenAI logprobs objects from the sampler's TokenLogprobs.

Logprobs are of the raw model distribution (before penalties and temperature; see
swakv.model.sampler). Token strings are each id decoded alone (special tokens kept),
so a multi-byte character split over byte-fallback tokens shows as U+FFFD pieces;
`bytes` (chat) still gives each piece's UTF-8 bytes of that decoded string.
"""

from __future__ import annotations

from typing import Any


class LogprobsFormatter:
    """Formats one response's logprobs; keeps each choice's text offset (completions)."""

    def __init__(self, tokenizer: Any, chat: bool) -> None:
        self.tokenizer, self.chat = tokenizer, chat
        self._offsets: dict[int, int] = {}
        self._cache: dict[tuple[int, bool], str] = {}

    def _text(self, token_id: int, skip_special: bool = False) -> str:
        text = self._cache.get((token_id, skip_special))
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=skip_special)
            self._cache[(token_id, skip_special)] = text
        return text

    def __call__(self, entries: list, index: int = 0) -> dict[str, Any] | None:
        entries = [e for e in entries if e is not None]
        if not entries:
            return None
        return self._chat(entries) if self.chat else self._completion(entries, index)

    def _chat(self, entries: list) -> dict[str, Any]:
        content = []
        for e in entries:
            token = self._text(e.token_id)
            top = [{"token": self._text(t), "logprob": lp,
                    "bytes": list(self._text(t).encode("utf-8"))}
                   for t, lp in zip(e.top_ids, e.top_logprobs)]
            content.append({"token": token, "logprob": e.logprob,
                            "bytes": list(token.encode("utf-8")), "top_logprobs": top})
        return {"content": content, "refusal": None}

    def _completion(self, entries: list, index: int) -> dict[str, Any]:
        tokens, lps, tops, offsets = [], [], [], []
        offset = self._offsets.get(index, 0)
        for e in entries:
            token = self._text(e.token_id)
            tokens.append(token)
            lps.append(e.logprob)
            tops.append({self._text(t): lp for t, lp in zip(e.top_ids, e.top_logprobs)})
            offsets.append(offset)
            offset += len(self._text(e.token_id, skip_special=True))  # as in the text
        self._offsets[index] = offset
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops,
                "text_offset": offsets}


def formatter(tokenizer: Any, chat: bool) -> LogprobsFormatter:
    return LogprobsFormatter(tokenizer, chat)
