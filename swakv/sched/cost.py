"""The cost model: the one place that says how much KV a request needs.

Admission, pool sizing and (later) PD preallocation all call it. Every figure is a
`Need` in tokens (whole pages).

For a request of current length L (prompt + outputs) with window W, page P,
frontier stride S and prefill chunk C:
- full need  = page_ceil(L + min(remaining outputs, decode_reserve))
- SWA need   = page_ceil(W + P + S) while decoding: the window the next query reads,
  the partially filled page, and the slack the amortised frontier leaves behind;
  while prefilling a chunk of c <= C tokens the chunk's own tokens are live on top of
  the W - 1 positions before it: page_ceil(W - 1 + c) + P + S.
  Both are capped by the full need (a short request never needs more SWA than tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

from swakv.memory.pages import Need, page_ceil
from swakv.sched.request import Request


@dataclass(frozen=True)
class CostModel:
    window: int | None  # None: the model has no sliding layers
    page_size: int
    chunk_size: int
    decode_reserve: int
    frontier_stride: int

    def swa_steady(self) -> int:
        """SWA tokens a decoding request holds at most."""
        if self.window is None:
            return 0
        return page_ceil(self.window + self.page_size + self.frontier_stride, self.page_size)

    def swa_prefill(self, chunk: int) -> int:
        """SWA tokens a request holds while prefilling a chunk of `chunk` tokens."""
        if self.window is None:
            return 0
        p = self.page_size
        return page_ceil(self.window - 1 + chunk, p) + p + page_ceil(self.frontier_stride, p)

    def need_for(self, length: int, remaining_outputs: int, prefill_chunk: int) -> Need:
        """Peak need of a request of `length` tokens (prefill_chunk 0 when decoding)."""
        full = page_ceil(length + min(remaining_outputs, self.decode_reserve), self.page_size)
        swa = self.swa_prefill(prefill_chunk) if prefill_chunk else self.swa_steady()
        return Need(full, min(full, swa) if self.window is not None else 0)

    def need(self, req: Request) -> Need:
        chunk = min(self.chunk_size, req.num_tokens_to_compute) if req.is_prefilling else 0
        return self.need_for(len(req.token_ids), req.max_new_tokens, chunk)

    def held(self, req: Request) -> Need:
        """What the request pins now: its row's pages, and the live SWA span it reads.

        The SWA span is [frontier, alloc_len) once the frontier passed the protected
        prefix, else the locked window before the protected end onwards.
        """
        kv = req.kv
        if kv is None:
            return Need(0, 0)
        full = page_ceil(kv.alloc_len, self.page_size)
        if self.window is None:
            return Need(full, 0)
        lo = kv.frontier if kv.frontier > kv.protected_len else max(
            0, kv.protected_len - (self.window - 1)
        )
        return Need(full, page_ceil(max(0, kv.alloc_len - lo), self.page_size))

    def outstanding(self, req: Request) -> Need:
        """What the request may still allocate before it finishes (never negative)."""
        return (self.need(req) - self.held(req)).clamp_min(0)
