"""One request's KV bookkeeping: owned and mutated by the cache facade only (the
scheduler and the engine read it).

Ownership of the request's row positions (DESIGN §2), all bounds page aligned except
`kv_len` and `alloc_len`:

```
[0, protected_len)            tree-owned, pinned by `lock`
[protected_len, alloc_len)    request-owned full pages
  [.., frontier)              request-owned, SWA already freed (mapping 0)
  [frontier, alloc_len)       request-owned, SWA live
```
`0 <= protected_len <= kv_len <= alloc_len`; the partial last page
`[page_floor(kv_len), alloc_len)` is always request-owned.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from swakv.cache.node import LockHandle


@dataclass
class ReqKV:
    """One request's KV bookkeeping; mutated only by the cache facade.

    - `row`: request row in the ReqTable; `row[p]` = full slot of position p (-1 once
      the facade gave the row back).
    - `token_ids`: tokens of positions 0..; KV exists for `[0, kv_len)`.
    - `kv_len`: positions `[0, kv_len)` have KV written.
    - `alloc_len`: positions `[0, alloc_len)` have slots in the row.
    - `protected_len`: `[0, protected_len)` are tree-owned, pinned by `lock`.
    - `frontier`: request-owned positions below this have had their SWA freed.
    - `lock`: the tree lock pinning `[0, protected_len)` (None with `ChunkCache` or
      before admission / after finish or release).
    """

    row: int
    token_ids: list[int] = field(default_factory=list)
    kv_len: int = 0
    alloc_len: int = 0
    protected_len: int = 0
    frontier: int = 0
    lock: LockHandle | None = None
