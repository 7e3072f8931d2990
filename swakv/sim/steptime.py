"""How long one simulated engine step takes: `a + b * tokens + c * attention_work`.

`tokens` is what the step computes (prefill chunk tokens plus one per decode).
`attention_work` counts key reads over all layers (`attention_work`): a decode reads
every visible key of a full layer and the window of a sliding layer; a prefill chunk
reads them once per block of 128 queries, so long prefills are charged for their
linear work (`b`) rather than per-query key reads, and decodes for the KV they read. The coefficients are given (`StepTimeModel(a, b, c)`),
fitted to steps timed on the real engine (`fit_step_time`, profiles from
`swakv.sim.profile`), or estimated from the model's size for an accelerator
(`StepTimeModel.roofline`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from itertools import combinations
from pathlib import Path

import numpy as np

from swakv.config import ModelSpec


class StepTimeError(ValueError):
    """Coefficients or a profile that do not describe a step time."""


QUERY_BLOCK = 128  # query tokens that share one read of their keys (prefill)


def attention_work(num_full_layers: int, num_swa_layers: int, window: int | None,
                   prefix_len: int, num_tokens: int) -> int:
    """Key reads (per layer, summed over layers) of queries at positions
    `[prefix_len, prefix_len + num_tokens)`, for a paged attention kernel that reads the
    keys a block of up to QUERY_BLOCK queries needs once per block (a decode: once).

    A block of positions `[q0, q1)` reads keys `[0, q1)` in a full layer and
    `[max(0, q0 - W + 1), q1)` in a sliding layer. Example: 2 full and 3 sliding
    layers, W = 4, prefix 2, 3 tokens (one block [2, 5)): 2 * 5 + 3 * 5 = 25; a decode
    at position 10 reads 11 keys per full layer and W = 4 per sliding layer.
    """
    lo, hi = prefix_len, prefix_len + num_tokens
    work = 0
    for q0 in range(lo, hi, QUERY_BLOCK):
        q1 = min(hi, q0 + QUERY_BLOCK)
        work += num_full_layers * q1
        if num_swa_layers and window is not None:
            work += num_swa_layers * (q1 - max(0, q0 - window + 1))
    return work


@dataclass(frozen=True)
class StepSample:
    """One timed step: `num_tokens` computed, `attention_work` key reads, `seconds` taken."""

    num_tokens: int
    attention_work: int
    seconds: float


@dataclass(frozen=True)
class StepTimeModel:
    """Seconds of one step: `a + b * num_tokens + c * attention_work` (all >= 0)."""

    a: float
    b: float
    c: float
    source: str = "given"

    def __post_init__(self) -> None:
        for name in ("a", "b", "c"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise StepTimeError(f"step time coefficient {name} must be finite and >= 0, "
                                    f"got {value}")
        if self.a == self.b == self.c == 0:
            raise StepTimeError("a step time model needs one positive coefficient")

    def seconds(self, num_tokens: int, work: int) -> float:
        return self.a + self.b * num_tokens + self.c * work

    @classmethod
    def parse(cls, text: str) -> StepTimeModel:
        """'A,B,C' in seconds, seconds per token, seconds per key read."""
        parts = text.split(",")
        if len(parts) != 3:
            raise StepTimeError(f"step time must be 'a,b,c', got {text!r}")
        try:
            a, b, c = (float(x) for x in parts)
        except ValueError as e:
            raise StepTimeError(f"step time must be three numbers 'a,b,c', got {text!r}") from e
        return cls(a, b, c, source=f"given ({text})")

    @classmethod
    def roofline(cls, spec: ModelSpec, kv_bytes_per_element: int, weight_bytes_per_param: float = 2.0,
                 mem_bytes_per_s: float = 3.35e12, flops_per_s: float = 989e12 * 0.5
                 ) -> StepTimeModel:
        """An estimate for one accelerator (default: an H100 SXM, 3.35 TB/s HBM, 989 dense
        bf16 TFLOP/s at 50% utilisation) from the model's size.

        a: one read of all weights (`dense_params(spec)` parameters) per step; b: 2 FLOPs
        per parameter per token; c: one layer's K and V of one key read from memory.
        Dense estimate: a mixture-of-experts model is charged as if every token used
        its dense width; give measured coefficients for anything that matters.
        """
        params = dense_params(spec)
        a = params * weight_bytes_per_param / mem_bytes_per_s
        b = 2.0 * params / flops_per_s
        per_layer_key = max(2 * x.num_kv_heads * x.head_dim for x in spec.layers)
        c = per_layer_key * kv_bytes_per_element / mem_bytes_per_s
        return cls(a, b, c, source=f"roofline estimate ({params / 1e9:.1f}B dense parameters, "
                   f"{mem_bytes_per_s / 1e12:.2f} TB/s, {flops_per_s / 1e12:.0f} TFLOP/s)")


def dense_params(spec: ModelSpec) -> int:
    """Parameters of a dense decoder: embeddings (twice unless tied), per layer the q/k/v/o
    projections and a gated MLP (3 * hidden * intermediate)."""
    h = spec.hidden_size
    total = spec.vocab_size * h * (1 if spec.tie_word_embeddings else 2)
    for a in spec.layers:
        q = spec.num_heads * a.head_dim
        kv = a.num_kv_heads * a.head_dim
        total += h * q * 2 + h * kv * 2 + 3 * h * spec.intermediate_size
    return total


def fit_step_time(samples: Sequence[StepSample]) -> StepTimeModel:
    """Least-squares non-negative fit of (a, b, c) to timed steps.

    Every subset of the three terms is fitted by ordinary least squares; among the fits
    whose coefficients are all >= 0 the one with the smallest residual wins (an exact
    non-negative least squares for three unknowns).
    """
    if len(samples) < 3:
        raise StepTimeError(f"need at least 3 timed steps to fit, got {len(samples)}")
    x = np.array([[1.0, s.num_tokens, s.attention_work] for s in samples], dtype=np.float64)
    y = np.array([s.seconds for s in samples], dtype=np.float64)
    scale = np.maximum(np.abs(x).max(axis=0), 1.0)  # condition the columns
    xs = x / scale
    best: tuple[float, np.ndarray] | None = None
    for k in (3, 2, 1):
        for cols in combinations(range(3), k):
            coef, *_ = np.linalg.lstsq(xs[:, cols], y, rcond=None)
            if (coef < 0).any():
                continue
            full = np.zeros(3)
            full[list(cols)] = coef
            residual = float(((xs @ full - y) ** 2).sum())
            if best is None or residual < best[0] - 1e-18:
                best = (residual, full)
    if best is None or not best[1].any():
        raise StepTimeError("no non-negative fit: step times do not grow with the work")
    a, b, c = (float(v) for v in best[1] / scale)
    rms = math.sqrt(best[0] / len(samples))
    return StepTimeModel(a, b, c, source=f"fitted to {len(samples)} steps (rms {rms * 1e3:.2f} ms)")


def write_profile(path: str | Path, samples: Iterable[StepSample]) -> None:
    """One JSON object per line: num_tokens, attention_work, seconds."""
    with open(path, "w") as f:
        for s in samples:
            f.write(json.dumps(asdict(s)) + "\n")


def read_profile(path: str | Path) -> list[StepSample]:
    samples = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                samples.append(StepSample(int(obj["num_tokens"]), int(obj["attention_work"]),
                                          float(obj["seconds"])))
            except (ValueError, KeyError, TypeError) as e:
                raise StepTimeError(f"{path}:{n}: not a step sample: {e}") from e
    return samples
