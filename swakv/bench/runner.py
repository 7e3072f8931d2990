"""Run the workloads against a server: sessions and documents concurrently, a
progress bar on a terminal, /metrics sampled throughout.

Workloads run one after the other (chat, then docs) so that each has its own
throughput; the pool sampler covers the whole run.
"""

from __future__ import annotations

import asyncio
import random
import sys
from dataclasses import dataclass, field

import httpx

from swakv.bench.client import PoolSample, PoolSampler, RequestRecord, clock, stream_completion
from swakv.bench.workload import (
    ChatPrompts,
    ChatWorkload,
    DocsWorkload,
    TokenRange,
    docs_prompts,
)


class BenchError(RuntimeError):
    """The server cannot be benchmarked (unreachable, no model, refuses requests)."""


@dataclass(frozen=True)
class BenchConfig:
    base_url: str  # server root, e.g. http://127.0.0.1:8000 (a trailing /v1 is dropped)
    model: str | None = None  # None: the first id of GET /v1/models
    api_key: str | None = None
    chat: ChatWorkload | None = field(default_factory=ChatWorkload)
    docs: DocsWorkload | None = field(default_factory=DocsWorkload)
    tokens: TokenRange = field(default_factory=TokenRange)
    seed: int = 0
    max_concurrency: int | None = None  # most requests in flight (None: no limit)
    scrape_interval: float = 0.5  # seconds between /metrics samples
    progress: bool | None = None  # None: when stderr is a terminal

    @property
    def root(self) -> str:
        url = self.base_url.rstrip("/")
        return url[: -len("/v1")] if url.endswith("/v1") else url


@dataclass
class BenchRun:
    config: BenchConfig
    model: str
    records: dict[str, list[RequestRecord]]  # workload name -> its requests, in finish order
    walls: dict[str, tuple[float, float]]  # workload name -> (start, end) since t0
    pool_samples: list[PoolSample]
    is_swakv: bool


def run_bench(config: BenchConfig) -> BenchRun:
    return asyncio.run(_run(config))


async def _run(cfg: BenchConfig) -> BenchRun:
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    width = max(cfg.max_concurrency or 0, cfg.chat.sessions if cfg.chat else 0,
                cfg.docs.num_docs if cfg.docs else 0) + 4
    limits = httpx.Limits(max_connections=width, max_keepalive_connections=width)
    timeout = httpx.Timeout(None, connect=30.0)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=timeout) as http:
        model = cfg.model or await _first_model(http, cfg.root)
        t0 = clock()
        sampler = PoolSampler(http, cfg.root, cfg.scrape_interval, t0)
        sampling = asyncio.create_task(sampler.run())
        total = (cfg.chat.num_requests if cfg.chat else 0) + (
            cfg.docs.num_requests if cfg.docs else 0)
        bar = _bar(total, cfg.progress)
        limit = asyncio.Semaphore(cfg.max_concurrency or total or 1)
        records: dict[str, list[RequestRecord]] = {}
        walls: dict[str, tuple[float, float]] = {}
        try:
            if cfg.chat:
                start = clock() - t0
                records["chat"] = await _run_chat(http, cfg, model, t0, limit, bar)
                walls["chat"] = (start, clock() - t0)
            if cfg.docs:
                start = clock() - t0
                records["docs"] = await _run_docs(http, cfg, model, t0, limit, bar)
                walls["docs"] = (start, clock() - t0)
        finally:
            sampler.stop()
            await sampling
            bar.close()
    return BenchRun(cfg, model, records, walls, sampler.samples, sampler.is_swakv)


async def _first_model(http: httpx.AsyncClient, root: str) -> str:
    try:
        resp = await http.get(root + "/v1/models", timeout=30.0)
    except httpx.HTTPError as e:
        raise BenchError(f"cannot reach {root}: {e}") from None
    if resp.status_code != 200:
        raise BenchError(f"GET {root}/v1/models answered {resp.status_code}: {resp.text[:200]}")
    data = resp.json().get("data") or []
    if not data:
        raise BenchError(f"{root}/v1/models lists no model; pass --model")
    return data[0]["id"]


def _bar(total: int, progress: bool | None):
    from tqdm import tqdm

    show = sys.stderr.isatty() if progress is None else progress
    return tqdm(total=total, desc="bench serve", unit="req", disable=not show,
                dynamic_ncols=True)


async def _one(http, cfg: BenchConfig, model: str, t0: float, limit: asyncio.Semaphore,
               bar, record: RequestRecord, prompt: list[int], max_tokens: int) -> RequestRecord:
    async with limit:
        record.start = clock() - t0
        await stream_completion(http, cfg.root, model, prompt, max_tokens, record, t0)
    bar.update()
    if record.error is not None:
        bar.set_postfix_str("errors", refresh=False)
    return record


async def _run_chat(http, cfg: BenchConfig, model: str, t0: float, limit, bar
                    ) -> list[RequestRecord]:
    w = cfg.chat
    assert w is not None
    prompts = ChatPrompts(w, cfg.tokens, cfg.seed)
    filler = random.Random(cfg.seed + 2)  # stands in for outputs a server does not return
    done: list[RequestRecord] = []

    async def session(s: int) -> None:
        prompt = prompts.first_prompt(s)
        for turn in range(w.turns):
            if turn:
                previous = done_by_session[s]
                output = (previous.output_ids if previous.token_ids_returned
                          else cfg.tokens.draw(filler, w.output_len))
                prompt = prompts.next_prompt(s, turn, prompt, output)
            record = RequestRecord("chat", s, turn, 0.0, len(prompt))
            await _one(http, cfg, model, t0, limit, bar, record, prompt, w.output_len)
            done.append(record)
            done_by_session[s] = record
            if record.error is not None:  # the conversation cannot go on without this turn
                bar.update(w.turns - turn - 1)
                return

    done_by_session: dict[int, RequestRecord] = {}
    await asyncio.gather(*(session(s) for s in range(w.sessions)))
    return done


async def _run_docs(http, cfg: BenchConfig, model: str, t0: float, limit, bar
                    ) -> list[RequestRecord]:
    w = cfg.docs
    assert w is not None
    prompts = docs_prompts(w, cfg.tokens, cfg.seed)
    records = [RequestRecord("docs", i, 0, 0.0, len(p)) for i, p in enumerate(prompts)]
    await asyncio.gather(*(_one(http, cfg, model, t0, limit, bar, r, p, w.output_len)
                           for r, p in zip(records, prompts)))
    return records
