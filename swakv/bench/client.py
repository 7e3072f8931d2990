"""One streamed /v1/completions request, and the /metrics sampler.

Times are seconds since the run's start (`clock()` - t0). A request's TTFT is the
time from sending it to the first chunk that carries output (token ids or text);
its latency runs to the end of the stream.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

clock = time.perf_counter


@dataclass
class RequestRecord:
    """What one request did; `error` is set (and the rest partial) when it failed."""

    workload: str
    session: int  # chat: session index; docs: document index
    turn: int  # chat: 0-based turn; docs: 0
    start: float
    prompt_tokens: int
    first_token: float | None = None
    end: float | None = None
    output_ids: list[int] = field(default_factory=list)  # when the server returns them
    output_tokens: int = 0
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens
    token_times: list[tuple[float, int]] = field(default_factory=list)  # (time, new tokens)
    token_ids_returned: bool = False
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.start

    @property
    def latency(self) -> float | None:
        return None if self.end is None else self.end - self.start


async def stream_completion(http: httpx.AsyncClient, base_url: str, model: str,
                            prompt_ids: list[int], max_tokens: int, record: RequestRecord,
                            t0: float) -> RequestRecord:
    """POST one streamed completion of `prompt_ids` with exactly `max_tokens` outputs
    (ignore_eos, greedy) and fill `record`. Never raises for server errors: they go
    to `record.error`."""
    body = {"model": model, "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
            "return_token_ids": True}
    try:
        async with http.stream("POST", base_url + "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                record.error = f"HTTP {resp.status_code}: {text[:300]}"
                return record
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                _on_chunk(record, json.loads(data), clock() - t0)
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        record.error = f"{type(e).__name__}: {e}"
        return record
    record.end = clock() - t0
    if record.error is None and record.output_tokens == 0:
        record.error = "the stream ended without output"
    return record


def _on_chunk(record: RequestRecord, chunk: dict[str, Any], now: float) -> None:
    if "error" in chunk:
        record.error = str(chunk["error"].get("message", chunk["error"]))
        return
    usage = chunk.get("usage")
    if usage:
        details = usage.get("prompt_tokens_details") or {}
        record.cached_tokens = details.get("cached_tokens")
        if not record.token_ids_returned:  # count from usage when there are no ids
            record.output_tokens = int(usage.get("completion_tokens") or record.output_tokens)
    for choice in chunk.get("choices") or ():
        ids = choice.get("token_ids")
        new = len(ids) if ids is not None else (1 if choice.get("text") else 0)
        if ids is not None:
            record.token_ids_returned = True
            record.output_ids += ids
            record.output_tokens = len(record.output_ids)
        elif new:
            record.output_tokens += new
        if new:
            if record.first_token is None:
                record.first_token = now
            record.token_times.append((now, new))


# ----------------------------------------------------------------------- /metrics


@dataclass(frozen=True)
class PoolSample:
    """swakv's KV pools at one time (tokens): used = requests + cached."""

    time: float
    full_used: float
    full_total: float
    swa_used: float
    swa_total: float
    full_requests: float
    swa_requests: float


def parse_pool_metrics(text: str) -> dict[tuple[str, str], float]:
    """{(pool, state): tokens} of `swakv_kv_pool_tokens` in a Prometheus text body."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "swakv_kv_pool_tokens":
            continue
        for sample in family.samples:
            out[(sample.labels.get("pool", ""), sample.labels.get("state", ""))] = sample.value
    return out


class PoolSampler:
    """Polls `/metrics` every `interval` seconds while a run goes on. A server without
    swakv's pool gauges (another engine) yields no samples; `is_swakv` says which."""

    def __init__(self, http: httpx.AsyncClient, base_url: str, interval: float, t0: float):
        self.http, self.url, self.interval, self.t0 = http, base_url + "/metrics", interval, t0
        self.samples: list[PoolSample] = []
        self.is_swakv = False
        self._stop = asyncio.Event()

    async def sample_once(self) -> None:
        try:
            resp = await self.http.get(self.url, timeout=5.0)
        except httpx.HTTPError:
            return
        if resp.status_code != 200:
            return
        try:
            pools = parse_pool_metrics(resp.text)
        except ValueError:  # not Prometheus text
            return
        if ("full", "used") not in pools:
            return
        self.is_swakv = True
        g = pools.get
        self.samples.append(PoolSample(
            clock() - self.t0, g(("full", "used"), 0.0), g(("full", "total"), 0.0),
            g(("swa", "used"), 0.0), g(("swa", "total"), 0.0), g(("full", "requests"), 0.0),
            g(("swa", "requests"), 0.0)))

    async def run(self) -> None:
        while not self._stop.is_set():
            await self.sample_once()
            try:
                await asyncio.wait_for(self._stop.wait(), self.interval)
            except TimeoutError:
                pass
        await self.sample_once()  # the state at the end of the run

    def stop(self) -> None:
        self._stop.set()
