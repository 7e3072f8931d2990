"""The two standard serving workloads, as token-id prompts (any tokenizer, no text).

chat: S sessions share one system prompt of `system_len` tokens; each session runs
T turns one after the other. Turn t's prompt is the whole conversation so far:
system + user_1 + output_1 + ... + user_t, with `user_len` new tokens per turn and
exactly `output_len` output tokens per turn (`ignore_eos`). Sessions run
concurrently, so the server sees S conversations that share a prefix and each
extend their own.

docs: D prompts of a length drawn uniformly from [min_len, max_len], `output_len`
output tokens each, all submitted at once.

Token ids are drawn uniformly from [token_lo, token_hi) by one `random.Random(seed)`
per workload, so a seed gives the same prompts on every server.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


class WorkloadError(ValueError):
    """A workload setting is out of range."""


@dataclass(frozen=True)
class TokenRange:
    """Prompt token ids are drawn from [lo, hi): pick ids that are ordinary tokens of
    the server's vocabulary (the default 1000:30000 suits 32k+ vocabularies)."""

    lo: int = 1000
    hi: int = 30000

    def __post_init__(self) -> None:
        if not 0 <= self.lo < self.hi:
            raise WorkloadError(f"token range must satisfy 0 <= lo < hi, got {self.lo}:{self.hi}")

    @classmethod
    def parse(cls, text: str) -> TokenRange:
        """'10:120' -> TokenRange(10, 120)."""
        lo, sep, hi = text.partition(":")
        if not sep or not lo.strip().isdigit() or not hi.strip().isdigit():
            raise WorkloadError(f"token range must look like LO:HI, got {text!r}")
        return cls(int(lo), int(hi))

    def draw(self, rng: random.Random, n: int) -> list[int]:
        return [rng.randrange(self.lo, self.hi) for _ in range(n)]


@dataclass(frozen=True)
class ChatWorkload:
    sessions: int = 64
    turns: int = 4
    system_len: int = 1000
    user_len: int = 100
    output_len: int = 64

    def __post_init__(self) -> None:
        for name in ("sessions", "turns", "user_len", "output_len"):
            if getattr(self, name) < 1:
                raise WorkloadError(f"chat {name} must be >= 1")
        if self.system_len < 0:
            raise WorkloadError("chat system_len must be >= 0")

    @property
    def num_requests(self) -> int:
        return self.sessions * self.turns


@dataclass(frozen=True)
class DocsWorkload:
    num_docs: int = 16
    min_len: int = 3000
    max_len: int = 6000
    output_len: int = 128

    def __post_init__(self) -> None:
        if self.num_docs < 1 or self.output_len < 1:
            raise WorkloadError("docs num_docs and output_len must be >= 1")
        if not 1 <= self.min_len <= self.max_len:
            raise WorkloadError(f"docs lengths must satisfy 1 <= min <= max, got "
                                f"{self.min_len}:{self.max_len}")

    @property
    def num_requests(self) -> int:
        return self.num_docs


class ChatPrompts:
    """Builds each session's turn prompts; `next_prompt` needs the previous turn's
    output ids (the server's, when it returns them)."""

    def __init__(self, workload: ChatWorkload, tokens: TokenRange, seed: int) -> None:
        self.workload, self.tokens = workload, tokens
        self.rng = random.Random(seed)
        self.system = tokens.draw(self.rng, workload.system_len)
        # One user message per (session, turn), drawn up front: the prompts do not
        # depend on the order in which sessions finish their turns.
        self.user = [[tokens.draw(self.rng, workload.user_len) for _ in range(workload.turns)]
                     for _ in range(workload.sessions)]

    def first_prompt(self, session: int) -> list[int]:
        return self.system + self.user[session][0]

    def next_prompt(self, session: int, turn: int, previous_prompt: list[int],
                    previous_output: list[int]) -> list[int]:
        """Prompt of `turn` (1-based turn index >= 1 here means the second turn on)."""
        return previous_prompt + previous_output + self.user[session][turn]


def docs_prompts(workload: DocsWorkload, tokens: TokenRange, seed: int) -> list[list[int]]:
    rng = random.Random(seed + 1)
    return [tokens.draw(rng, rng.randint(workload.min_len, workload.max_len))
            for _ in range(workload.num_docs)]
