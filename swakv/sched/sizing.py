"""Pool sizing from a KV memory budget, and the capacity line logged at start-up."""

from __future__ import annotations

from swakv.config import EngineConfig, KVLayout
from swakv.memory.pages import num_pages, page_ceil
from swakv.memory.sizes import PoolSizes  # re-exported: callers import it from here
from swakv.sched.cost import CostModel


class PoolTooSmall(ValueError):
    """The KV budget cannot hold even one request of minimal size."""


def available_ram_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), else 4 GiB."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def kv_budget_bytes(kv_memory: float) -> int:
    return int(kv_memory) if kv_memory > 1 else int(kv_memory * available_ram_bytes())


# Context assumed when sizing a zero-byte full pool without a max_context (tokens).
DEFAULT_SLOT_CONTEXT = 131_072


def size_pools(layout: KVLayout, cfg: EngineConfig, cost: CostModel,
               max_context: int | None = None) -> PoolSizes:
    """Split the KV budget between the full and the SWA pool.

    Without `swa_fraction`, the SWA pool gets what `max_running_requests` decoding
    windows plus one prefill chunk's transient need, and the full pool the rest.

    A pool whose layers cost zero bytes per token still exists, because rows name
    token slots through it (DESIGN §2):
    - no sliding layers: the SWA pool has as many pages as the full pool, so it never
      limits an allocation (every full page can map one), and costs nothing;
    - no full layers: the whole budget goes to the SWA pool and the full pool has
      enough pages for `2 * max_running_requests` requests of the context limit
      (`max_context`, else `cfg.max_context`, else DEFAULT_SLOT_CONTEXT): running
      requests plus as much again for cached prefixes, whose full pages cost nothing.
    """
    p = cfg.page_size
    budget = kv_budget_bytes(cfg.kv_memory)
    full_bpt = layout.bytes_per_token(sliding=False)
    swa_bpt = layout.bytes_per_token(sliding=True)
    if swa_bpt == 0:
        swa_bytes = 0
    elif full_bpt == 0:
        swa_bytes = budget
    elif cfg.swa_fraction is not None:
        swa_bytes = int(budget * cfg.swa_fraction)
    else:
        swa_tokens = cfg.max_running_requests * cost.swa_steady() + cost.swa_prefill(cfg.chunk_size)
        swa_bytes = min(swa_tokens * swa_bpt, budget // 2)
    full_bytes = budget - swa_bytes
    if full_bpt:
        num_full_pages = full_bytes // (full_bpt * p) - 1
    else:
        context = max_context or cfg.max_context or DEFAULT_SLOT_CONTEXT
        num_full_pages = 2 * cfg.max_running_requests * num_pages(context, p)
    num_swa_pages = swa_bytes // (swa_bpt * p) - 1 if swa_bpt else num_full_pages
    min_swa = (cost.swa_prefill(1) // p) if swa_bpt else 0
    if num_full_pages < 2 or num_swa_pages < min_swa:
        raise PoolTooSmall(
            f"KV budget of {budget} bytes gives {num_full_pages} full and {num_swa_pages} SWA "
            f"pages of {p} tokens; need at least 2 full and {min_swa} SWA pages"
        )
    return PoolSizes(
        num_full_pages=num_full_pages,
        num_swa_pages=max(0, num_swa_pages),
        page_size=p,
        full_bytes=(num_full_pages + 1) * p * full_bpt,
        swa_bytes=(max(0, num_swa_pages) + 1) * p * swa_bpt,
    )


def capacity_line(sizes: PoolSizes, cost: CostModel, lengths: tuple[int, ...] = (8192, 32768)) -> str:
    """'KV pools: full 1.2 GiB (…), SWA …; fits 12 concurrent requests of 8k tokens, 3 of 32k'."""
    parts = []
    for length in lengths:
        full = sizes.full_tokens // page_ceil(length, sizes.page_size)
        steady = cost.swa_steady()
        swa = sizes.swa_tokens // min(steady, page_ceil(length, sizes.page_size)) if steady else full
        parts.append(f"{min(full, swa)} of {length // 1024}k")
    gib = 1 << 30
    return (
        f"KV pools: full {sizes.full_bytes / gib:.2f} GiB ({sizes.full_tokens} tokens), "
        f"SWA {sizes.swa_bytes / gib:.2f} GiB ({sizes.swa_tokens} tokens); fits "
        f"{parts[0]} tokens" + "".join(f", {x}" for x in parts[1:]) + " concurrently"
    )
