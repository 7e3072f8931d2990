"""Request traces for the simulator: chat and documents shapes, and a JSONL format.

A trace is a list of sessions. A session's first turn arrives at `arrival`; each later
turn arrives `think_time` seconds after the previous one finished, and its prompt is
the previous prompt plus its outputs plus the turn's new tokens (a conversation). A
one-turn session is an open-loop request.

Prompt tokens are described, not stored: a `Segment(key, length)` stands for the first
`length` tokens of a stream drawn from `key`, so equal keys give equal tokens and
shared prefixes (a system prompt, a document, a hash chain of blocks) stay shared
without holding thousands of prompts in memory.

JSONL (one request per line, open loop):
    {"arrival": 0.5, "prompt_ids": [2, 17, 9], "output_len": 64}
    {"timestamp": 500, "hash_ids": [0, 1, 7], "input_length": 1400, "output_length": 128}
`arrival` is seconds (or `timestamp` milliseconds, Mooncake's trace format); the
prompt is `prompt_ids`, or `hash_ids`: block i is `block_tokens` (default 512) tokens
drawn from id i, the last block holding the rest of `input_length` (a prompt sharing
the first k ids shares the first k blocks).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FIRST_TRACE_TOKEN = 3  # trace tokens avoid ids 0..2 (pad, eos, bos in Gemma's vocabulary)
DEFAULT_BLOCK_TOKENS = 512
DEFAULT_SESSION_RATE = 0.5  # chat sessions per second
DEFAULT_DOC_RATE = 0.05  # documents per second


class TraceError(ValueError):
    """A trace file or trace parameters that do not describe requests."""


@dataclass(frozen=True)
class Segment:
    """The first `length` tokens of the stream drawn from `key` (a tuple of ints)."""

    key: tuple[int, ...]
    length: int


@dataclass(frozen=True)
class Turn:
    """One request of a session: `segments` (or `token_ids`) appended to the
    conversation, then `output_len` outputs."""

    output_len: int
    segments: tuple[Segment, ...] = ()
    token_ids: tuple[int, ...] = ()
    think_time: float = 0.0  # after the previous turn finished (the first turn: unused)

    @property
    def num_new_tokens(self) -> int:
        return len(self.token_ids) + sum(s.length for s in self.segments)


@dataclass(frozen=True)
class Session:
    arrival: float
    turns: tuple[Turn, ...]


@dataclass(frozen=True)
class Trace:
    name: str
    sessions: tuple[Session, ...]
    seed: int = 0
    params: dict = field(default_factory=dict)

    @property
    def num_requests(self) -> int:
        return sum(len(s.turns) for s in self.sessions)


def segment_tokens(segment: Segment, vocab_size: int, seed: int = 0) -> list[int]:
    """Token ids of a segment: equal (key, seed) give equal streams, of which a longer
    segment extends a shorter one."""
    rng = np.random.default_rng([*segment.key, seed])
    span = vocab_size - FIRST_TRACE_TOKEN  # one 64-bit draw per token: prefixes agree
    return (FIRST_TRACE_TOKEN + (rng.random(segment.length) * span).astype(np.int64)).tolist()


def turn_tokens(turn: Turn, vocab_size: int, seed: int = 0) -> list[int]:
    out = list(turn.token_ids)
    for s in turn.segments:
        out += segment_tokens(s, vocab_size, seed)
    return out


# ---- built-in shapes -----------------------------------------------------------------

_SYSTEM, _USER, _DOC, _QUESTION, _BLOCK = 1, 2, 3, 4, 5  # segment key tags


def chat_trace(num_requests: int, seed: int = 0, session_rate: float = DEFAULT_SESSION_RATE,
               system_lens: tuple[int, ...] = (2048, 4096, 6144, 8192),
               turns: tuple[int, int] = (2, 8), user_len: tuple[int, int] = (50, 800),
               output_len: tuple[int, int] = (64, 512), think_time: float = 5.0) -> Trace:
    """Multi-turn chat, scaled up from `bench/serve_workload.py`'s chat shape.

    Sessions arrive as a Poisson process of `session_rate` per second; each has one of
    `len(system_lens)` shared system prompts (chosen uniformly), a number of turns
    uniform in `turns` (the last session is cut so the trace has exactly `num_requests`
    requests), per turn a new user message of uniform length in `user_len` and a
    uniform output length in `output_len`, and an exponential think time of mean
    `think_time` seconds between turns. Contexts grow to about 8k-16k tokens.
    """
    if num_requests < 1 or session_rate <= 0:
        raise TraceError("chat trace needs num_requests >= 1 and session_rate > 0")
    rng = np.random.default_rng(seed)
    sessions, t, left, s = [], 0.0, num_requests, 0
    while left > 0:
        t += float(rng.exponential(1.0 / session_rate))
        n = min(left, int(rng.integers(turns[0], turns[1] + 1)))
        system = int(rng.integers(0, len(system_lens)))
        out = []
        for k in range(n):
            segs = (Segment((_USER, s, k), int(rng.integers(user_len[0], user_len[1] + 1))),)
            if k == 0:
                segs = (Segment((_SYSTEM, system), system_lens[system]),) + segs
            out.append(Turn(int(rng.integers(output_len[0], output_len[1] + 1)), segs,
                            think_time=float(rng.exponential(think_time)) if k else 0.0))
        sessions.append(Session(t, tuple(out)))
        left, s = left - n, s + 1
    return Trace("chat", tuple(sessions), seed, dict(
        session_rate=session_rate, system_lens=list(system_lens), turns=list(turns),
        user_len=list(user_len), output_len=list(output_len), think_time=think_time))


def docs_trace(num_requests: int, seed: int = 0, doc_rate: float = DEFAULT_DOC_RATE,
               doc_len: tuple[int, int] = (8192, 131072), questions: tuple[int, int] = (1, 3),
               question_len: tuple[int, int] = (20, 200), output_len: int = 256,
               question_gap: float = 10.0) -> Trace:
    """Long documents, scaled up from `bench/serve_workload.py`'s documents shape.

    Documents arrive as a Poisson process of `doc_rate` per second, with lengths
    log-uniform in `doc_len` (8k-128k tokens); each gets a number of questions uniform
    in `questions`, asked as separate requests (document + question) `question_gap`
    seconds apart on average (exponential), so later questions can hit the cached
    document. Every answer has `output_len` tokens.
    """
    if num_requests < 1 or doc_rate <= 0:
        raise TraceError("docs trace needs num_requests >= 1 and doc_rate > 0")
    rng = np.random.default_rng(seed)
    sessions, t, left, d = [], 0.0, num_requests, 0
    lo, hi = np.log(doc_len[0]), np.log(doc_len[1])
    while left > 0:
        t += float(rng.exponential(1.0 / doc_rate))
        length = int(np.exp(rng.uniform(lo, hi)))
        n = min(left, int(rng.integers(questions[0], questions[1] + 1)))
        ask = t
        for q in range(n):
            ask += float(rng.exponential(question_gap)) if q else 0.0
            segs = (Segment((_DOC, d), length),
                    Segment((_QUESTION, d, q), int(rng.integers(question_len[0],
                                                                question_len[1] + 1))))
            sessions.append(Session(ask, (Turn(output_len, segs),)))
        left, d = left - n, d + 1
    sessions.sort(key=lambda x: x.arrival)
    return Trace("docs", tuple(sessions), seed, dict(
        doc_rate=doc_rate, doc_len=list(doc_len), questions=list(questions),
        question_len=list(question_len), output_len=output_len, question_gap=question_gap))


# ---- JSONL ---------------------------------------------------------------------------

def read_jsonl(path: str | Path, limit: int | None = None) -> Trace:
    """Read a JSONL trace (module docstring); requests sorted by arrival."""
    sessions = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            if limit is not None and len(sessions) >= limit:
                break
            try:
                sessions.append(_parse_record(json.loads(line)))
            except (ValueError, KeyError, TypeError) as e:
                raise TraceError(f"{path}:{n}: {e}") from e
    if not sessions:
        raise TraceError(f"{path}: no requests")
    sessions.sort(key=lambda s: s.arrival)
    return Trace(Path(path).name, tuple(sessions))


def _parse_record(obj: dict) -> Session:
    if not isinstance(obj, dict):
        raise TraceError("each line must be a JSON object")
    if "arrival" in obj:
        arrival = float(obj["arrival"])
    else:
        arrival = float(obj["timestamp"]) / 1000.0
    out_len = int(obj.get("output_len", obj.get("output_length", -1)))
    if out_len < 1 or arrival < 0:
        raise TraceError("output_len must be >= 1 and arrival >= 0")
    if "prompt_ids" in obj:
        ids = tuple(int(t) for t in obj["prompt_ids"])
        if not ids:
            raise TraceError("prompt_ids is empty")
        return Session(arrival, (Turn(out_len, token_ids=ids),))
    hash_ids = [int(h) for h in obj["hash_ids"]]
    if any(h < 0 for h in hash_ids):
        raise TraceError("hash_ids must be >= 0")
    block = int(obj.get("block_tokens", DEFAULT_BLOCK_TOKENS))
    total = int(obj["input_length"])
    if not hash_ids or block < 1:
        raise TraceError("hash_ids must be non-empty and block_tokens >= 1")
    last = total - (len(hash_ids) - 1) * block
    if not 0 < last <= block:
        raise TraceError(f"input_length {total} does not fit {len(hash_ids)} blocks of {block}")
    segs = tuple(Segment((_BLOCK, h), block) for h in hash_ids[:-1])
    segs += (Segment((_BLOCK, hash_ids[-1]), last),)
    return Session(arrival, (Turn(out_len, segs),))


def write_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
