"""A capacity plan: every policy at every context, as a terminal table or JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from swakv.config import MIB, parse_size
from swakv.plan.models import PlanModel
from swakv.plan.policies import (
    LLAMACPP_CELL_PAD,
    Capacity,
    KVShape,
    PlanError,
    SwakvKnobs,
    llamacpp_capacity,
    no_swa_savings,
    sglang_static_split,
    swakv_capacity,
    vllm_hybrid,
)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.float8_e4m3fn,
          "fp32": torch.float32}


@dataclass(frozen=True)
class OtherKnobs:
    """The other engines' settings, at their defaults."""

    sglang_swa_ratio: float = 0.8
    vllm_block_size: int = 16
    vllm_max_batched_tokens: int = 8192
    llamacpp_ubatch: int = 512

    def __post_init__(self) -> None:
        for name in ("vllm_block_size", "vllm_max_batched_tokens", "llamacpp_ubatch"):
            if getattr(self, name) < 1:
                raise PlanError(f"{name} must be >= 1")
        if not 0 < self.sglang_swa_ratio <= 1:
            raise PlanError(f"sglang_swa_ratio must be in (0, 1], got {self.sglang_swa_ratio}")


@dataclass(frozen=True)
class Plan:
    model: PlanModel
    dtype: str
    budget: int
    contexts: tuple[int, ...]
    shape: KVShape
    rows: tuple[tuple[str, tuple[Capacity | None, ...]], ...]  # None: beyond the context limit
    knobs: SwakvKnobs
    others: OtherKnobs
    budget_label: str  # as the user wrote it (for the printed flags)


def make_plan(model: PlanModel, budget: int, contexts: tuple[int, ...], dtype: str = "bf16",
              knobs: SwakvKnobs | None = None, others: OtherKnobs | None = None,
              budget_label: str | None = None) -> Plan:
    knobs, others = knobs or SwakvKnobs(), others or OtherKnobs()
    if dtype not in DTYPES:
        raise PlanError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if budget < MIB:
        raise PlanError(f"the KV budget must be at least 1 MiB, got {budget} bytes")
    if not contexts or min(contexts) < 1:
        raise PlanError("every context must be positive")
    torch_dtype = DTYPES[dtype]
    shape = KVShape.of(model.spec, torch_dtype)
    limit = model.spec.max_position_embeddings
    policies = {
        "swakv": lambda L: swakv_capacity(model.spec, torch_dtype, budget, L, knobs),
        "no SWA savings": lambda L: no_swa_savings(shape, budget, L, knobs.page_size),
        f"SGLang static split ({others.sglang_swa_ratio:g})":
            lambda L: sglang_static_split(shape, budget, L, knobs.page_size,
                                          others.sglang_swa_ratio),
        "vLLM hybrid allocator": lambda L: vllm_hybrid(shape, budget, L, others.vllm_block_size,
                                                       others.vllm_max_batched_tokens),
        "llama.cpp per slot": lambda L: llamacpp_capacity(shape, budget, L,
                                                          others.llamacpp_ubatch),
        "llama.cpp unified KV": lambda L: llamacpp_capacity(shape, budget, L,
                                                            others.llamacpp_ubatch, True),
    }
    rows = tuple((name, tuple(fn(L) if L <= limit else None for L in contexts))
                 for name, fn in policies.items())
    return Plan(model, dtype, budget, tuple(contexts), shape, rows, knobs, others,
                budget_label or str(budget))


def context_label(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def size_label(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def plan_table(plan: Plan) -> str:
    m, s, shape = plan.model, plan.model.spec, plan.shape
    window = f"W {s.window}" if s.window is not None else "no window"
    lines = [
        f"{m.name}: {s.num_layers} layers = {shape.num_full_layers} full + "
        f"{shape.num_swa_layers} sliding ({window}); context limit {s.max_position_embeddings}",
        f"KV {plan.dtype}: {size_label(shape.full_bytes)} per token in full layers, "
        f"{size_label(shape.swa_bytes)} in sliding layers; budget {size_label(plan.budget)}, "
        f"page {plan.knobs.page_size}",
        f"source: {m.source}",
        *(f"note: {n}" for n in m.notes),
        "",
        "concurrent requests per context (prompt + output tokens)",
    ]
    width = max(len(name) for name, _ in plan.rows) + 2
    lines.append("policy".ljust(width) + "".join(f"{context_label(c):>10}" for c in plan.contexts))
    for name, caps in plan.rows:
        cells = "".join(f"{'n/a' if c is None else c.num_requests:>10}" for c in caps)
        lines.append(name.ljust(width) + cells)
    lines += ["", f"swakv pools per context (`swakv serve --kv-memory {plan.budget_label} "
              f"--page-size {plan.knobs.page_size}` plus these flags allocates them)"]
    for c in dict(plan.rows)["swakv"]:
        if c is None or c.num_requests == 0:
            continue
        d = c.detail
        flags = f"--max-running-requests {d['max_running_requests']}"
        if d["swa_fraction"] is not None:
            flags = f"--swa-fraction {d['swa_fraction']:.6f} " + flags
        lines.append(f"  {context_label(c.context):>6}: full {size_label(c.full_bytes)} "
                     f"({c.full_tokens:,} tokens), SWA {size_label(c.swa_bytes)} "
                     f"({c.swa_tokens:,} tokens); {flags}")
    lines += ["", "others' pools"]
    for name, caps in plan.rows:
        c = next((x for x in caps if x is not None), None)
        if c is None:
            continue
        if c.policy == "SGLang static split":
            lines.append(f"  {name}: full {size_label(c.full_bytes)} ({c.full_tokens:,} tokens), "
                         f"SWA {size_label(c.swa_bytes)} ({c.swa_tokens:,} tokens)")
        elif c.policy == "vLLM hybrid allocator":
            d = c.detail
            lines.append(f"  {name}: {d['num_blocks']:,} blocks of {d['block_size']} tokens x "
                         f"{d['group_size']} layers; groups: {d['full_groups']} full, "
                         f"{d['sliding_groups']} sliding, {d['padding_layers']} padding layers; "
                         f"max_num_batched_tokens {d['max_num_batched_tokens']}")
    lines.append(f"  llama.cpp: n_ubatch {plan.others.llamacpp_ubatch}, cells padded to "
                 f"{LLAMACPP_CELL_PAD}")
    return "\n".join(lines)


def plan_json(plan: Plan) -> dict:
    s = plan.model.spec
    return {
        "model": {"name": plan.model.name, "source": plan.model.source,
                  "notes": list(plan.model.notes), "num_layers": s.num_layers,
                  "num_full_layers": plan.shape.num_full_layers,
                  "num_sliding_layers": plan.shape.num_swa_layers, "window": s.window,
                  "max_position_embeddings": s.max_position_embeddings},
        "dtype": plan.dtype, "budget_bytes": plan.budget, "contexts": list(plan.contexts),
        "kv_bytes_per_token": {"full": plan.shape.full_bytes, "sliding": plan.shape.swa_bytes},
        "swakv_knobs": asdict(plan.knobs), "other_knobs": asdict(plan.others),
        "policies": [{"policy": name, "per_context": [
            None if c is None else asdict(c) for c in caps]} for name, caps in plan.rows],
    }


def parse_contexts(text: str) -> tuple[int, ...]:
    """'8k,32k,128k' (k = 1024 tokens) or plain token counts."""
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        try:
            n = int(part[:-1]) * 1024 if part.endswith("k") else int(part)
        except ValueError as e:
            raise PlanError(f"not a context length: {part!r} (use 8k or 8192)") from e
        if n < 1:
            raise PlanError(f"context lengths must be positive, got {part!r}")
        out.append(n)
    return tuple(out)


def parse_bytes(text: str) -> int:
    """`swakv.config.parse_size` in whole bytes: '60GiB', '512MiB', '80G' (K/M/G/T decimal
    unless followed by 'i'), or bytes. Not `parse_kv_memory`: a plan's budget is an
    accelerator's, never a fraction of this machine's RAM (the 1 MiB floor: `make_plan`)."""
    try:
        value = parse_size(text)
    except ValueError as e:
        raise PlanError(f"not a size: {text!r} (use 60GiB, 80G or bytes)") from e
    if value < 1:
        raise PlanError(f"a KV budget must be at least 1 byte, got {text!r}")
    return int(value)
