"""Host KV tier (issue 9): exact pages and pool deltas for backup, demotion, host
eviction, host-aware match and window-only load-back, for page sizes 1, 4 and 16
and windows below, at and above the page size; the seed scenario (load-back under SWA
pressure evicts no full KV) and its reverse.

Pools are real (`KVPool`, `HostKVPool`, `CopyEngine`) with one full and one sliding
layer of head_dim 2; every written slot holds (token, position), so each check reads
the KV back through the pools."""

from __future__ import annotations

import pytest
import torch

from swakv.cache import HiCache, MatchResult, ReqKV
from swakv.cache.tree_host import HostTier
from swakv.config import AttentionSpec, AttnKind, KVLayout
from swakv.memory import Need, ReqTable, SWAAllocator
from swakv.memory.copy_engine import CopyEngine
from swakv.memory.host_pool import HostKVPool, HostPoolSizes
from swakv.memory.kv_pool import KVPool
from swakv.memory.pages import num_pages, page_floor

# (page, window): window below, at and above the page size
CONFIGS = [(1, 3), (4, 3), (4, 4), (4, 9), (16, 8), (16, 16), (16, 37)]


class Rig:
    def __init__(self, page: int, window: int, full_pages: int = 96, swa_pages: int = 96,
                 host_full: int = 96, host_swa: int = 96, threshold: int = 1,
                 check_every_step: bool = True) -> None:
        self.page, self.window = page, window
        layout = KVLayout((AttentionSpec(AttnKind.FULL, 1, 2, 1e4),
                           AttentionSpec(AttnKind.SLIDING, 1, 2, 1e4, window=window)),
                          torch.float32)
        self.alloc = SWAAllocator(full_pages, swa_pages, page)
        self.kv = KVPool(layout, self.alloc)
        self.host = HostKVPool(layout, HostPoolSizes(host_full, host_swa, page, 0, 0))
        self.tier = HostTier(self.host, CopyEngine(self.kv, self.host), threshold)
        self.table = ReqTable(8, 4096)
        self.cache = HiCache(self.alloc, self.table, page, window, self.tier)
        self.tree = self.cache.tree
        self.live: list[ReqKV] = []  # admitted, not yet finished or released
        self.check_every_step = check_every_step
        self.check()

    def _step(self) -> None:
        """After every cache operation: device, host and request bookkeeping consistent."""
        if self.check_every_step:
            self.check()

    # ---- requests -------------------------------------------------------------------
    def admit(self, tokens: list[int], match: MatchResult | None = None) -> ReqKV:
        """Admit `tokens` on `match` (default: a fresh match of them)."""
        kv = self.cache.admit(list(tokens), self.cache.match(tokens) if match is None else match)
        self.live.append(kv)
        self._step()
        return kv

    def compute(self, kv: ReqKV, end: int | None = None) -> None:
        """Allocate and write (token, position) KV for [kv_len, end)."""
        end = len(kv.token_ids) if end is None else end
        start = kv.kv_len
        self.cache.extend(kv, end - start)
        slots = self.table.read(kv.row, start, end)
        data = torch.tensor([[t, start + i] for i, t in enumerate(kv.token_ids[start:end])],
                            dtype=torch.float32)
        self.kv.full_k[0][slots, 0] = data
        mapped = self.alloc.is_swa_mapped(slots)
        self.kv.swa_k[0][self.alloc.translate(slots)[mapped], 0] = data[mapped]
        self.cache.mark_computed(kv, end)
        self._step()

    def commit(self, kv: ReqKV, anchor: bool = False) -> None:
        self.cache.cache_unfinished(kv, anchor=anchor)
        self._step()

    def finish(self, kv: ReqKV) -> None:
        self.cache.cache_finished(kv)
        self.live.remove(kv)
        self._step()

    def release(self, kv: ReqKV) -> None:
        self.cache.release(kv)
        self.live.remove(kv)
        self._step()

    def evict(self, need: Need) -> Need:
        freed = self.cache.evict(need)
        self._step()
        return freed

    def evict_host(self, need_pages: Need) -> Need:
        freed = self.tree.evict_host(need_pages)
        self._step()
        return freed

    def hit(self, node) -> None:
        """One more use of the path root..node (may back it up)."""
        self.tree.note_hits(node)
        self.tree.maybe_backup(node)
        self._step()

    def run(self, tokens: list[int]) -> None:
        kv = self.admit(tokens)
        self.compute(kv)
        self.finish(kv)
        self.check()

    def close(self) -> None:
        """Finish every live request, evict everything from both tiers: every device and
        host pool, and the request table, must be back at its initial free count."""
        for kv in list(self.live):
            self.finish(kv)
        self.evict(Need(10**9, 10**9))
        self.evict_host(Need(10**9, 10**9))
        self.check()
        assert self.alloc.available() == self.alloc.total(), "device pools not back at baseline"
        assert self.host.available() == self.host.total(), "host pools not back at baseline"
        assert self.table.num_free == self.table.num_rows, "request rows leaked"
        assert self.tree.num_nodes == 0

    def verify(self, kv: ReqKV, upto: int) -> None:
        """Full KV of [0, upto) and SWA KV of its window read back as (token, position)."""
        slots = self.table.read(kv.row, 0, upto)
        want = torch.tensor([[t, i] for i, t in enumerate(kv.token_ids[:upto])],
                            dtype=torch.float32).reshape(-1, 2)
        assert torch.equal(self.kv.full_k[0][slots, 0], want), "full KV wrong"
        lo = max(0, upto - (self.window - 1))
        win = slots[lo:]
        assert bool(self.alloc.is_swa_mapped(win).all()), "window not on the device"
        assert torch.equal(self.kv.swa_k[0][self.alloc.translate(win), 0], want[lo:]), "SWA KV wrong"

    def check(self, live=None) -> None:
        """Integrity with `live` (default: the requests admitted through this rig)."""
        self.kv.check_integrity()
        self.cache.check_integrity(self.live if live is None else live)

    # ---- inspection -----------------------------------------------------------------
    def path(self, tokens: list[int]):
        """Nodes on the tree path of `tokens` (whole nodes only)."""
        p, node, pos, out = self.page, self.tree.root, 0, []
        while pos < len(tokens):
            child = node.children.get(tuple(tokens[pos : pos + p]))
            if child is None or tuple(tokens[pos : child.end]) != child.key:
                break
            out.append(child)
            node, pos = child, child.end
        return out

    def host_used(self) -> Need:
        return self.host.total() - self.host.available()


def seq(n: int, base: int) -> list[int]:
    return [base + i for i in range(n)]


# ------------------------------------------------------------------------------ backup
@pytest.mark.parametrize("page, window", CONFIGS)
def test_backup_after_n_hits_ancestors_first(page, window):
    p = page
    r = Rig(page, window, threshold=2)
    a = seq(6 * p, 1000)
    kv = r.admit(a)
    for end in (2 * p, 4 * p, 6 * p):  # chunked prefill: three nodes on one path
        r.compute(kv, end)
        r.commit(kv)
    r.finish(kv)
    nodes = r.path(a)
    assert [n.end for n in nodes][-1] == 6 * p and all(n.hits == 1 for n in nodes)
    assert r.host_used() == Need() and all(n.host_full is None for n in nodes)  # 1 use < 2
    # A hit on the whole path is the second use of every node: all backed up, ancestors
    # first, so the host pages along the path come out of the FIFO list in order.
    kv = r.admit(a + [7])
    nodes = r.path(a)
    assert all(n.host_full is not None for n in nodes)
    host_pages = torch.cat([n.host_full for n in nodes]).tolist()
    assert host_pages == list(range(1, 6 + 1))
    # Host SWA is copied for live nodes, then along the chain only the newest window
    # keeps it: nodes ending W + page or more before the end become host tombstones.
    live = [n for n in nodes if n.swa_live]
    keep_from = 6 * p - window - p
    kept = [n for n in live if n.end > keep_from]
    assert all((n.host_swa is not None) == (n in kept) for n in nodes)
    assert r.host_used() == Need(6 * p, sum(len(n.key) for n in kept))
    c = r.tree.host_counters
    assert (c["backed_up_full_tokens"], c["backed_up_swa_tokens"]) == (
        6 * p, sum(len(n.key) for n in live))
    assert c["host_trimmed_swa_tokens"] == c["backed_up_swa_tokens"] - r.host_used().swa
    # host bytes equal the device bytes page for page
    for n in nodes:
        dev = n.value[::p] // p
        for off in range(p):
            assert torch.equal(r.host.full_k[0][n.host_full * p + off],
                               r.kv.full_k[0][dev * p + off])
    r.release(kv)
    r.check()
    r.close()


@pytest.mark.parametrize("page, window", CONFIGS)
def test_only_live_device_swa_is_backed_up(page, window):
    p = page
    r = Rig(page, window, threshold=2)
    a = seq(8 * p, 2000)
    r.run(a)
    r.evict(Need(0, 10**6))  # SWA-only: every unlocked node becomes a tombstone
    nodes = r.path(a)
    assert not any(n.swa_live for n in nodes)
    r.hit(nodes[-1])  # a second use of the path: backed up, without SWA
    assert all(n.host_full is not None and n.host_swa is None for n in r.path(a))
    assert r.host_used() == Need(8 * p, 0)
    r.check()
    r.close()


# ---------------------------------------------------------------------------- demotion
@pytest.mark.parametrize("page, window", CONFIGS)
def test_demotion_keeps_the_node_matchable_from_the_host(page, window):
    p = page
    r = Rig(page, window)
    a = seq(5 * p, 3000)
    r.run(a)  # threshold 1: backed up at insert
    dev_before = r.alloc.available()
    freed = r.evict(Need(10**6, 0))
    assert freed.full == 5 * p and r.alloc.available() == r.alloc.total()
    assert dev_before + freed == r.alloc.total()
    nodes = r.path(a)
    assert nodes and all(n.value is None and n.host_full is not None for n in nodes)
    assert r.tree.host_counters["demoted_tokens"] == 5 * p
    m = r.cache.match(a + [1])
    assert (m.prefix_len, m.full_only_len, m.host_prefix_len) == (0, 5 * p, 5 * p)
    assert m.host_extension == 5 * p
    r.check()
    r.close()


# ------------------------------------------------------------------------ host eviction
def test_host_eviction_order_and_host_tombstones():
    # page 4, W 4. Host pools of 6 pages each. X, Y (1 page each, separate branches) and
    # a chain C1 -> C2 (1 page each) fill 4 host pages. X is hit (recent). Z needs 4 host
    # pages of each pool, 2 are free: host eviction pops the LRU: Y (leaf: loses its
    # copy, stays on the device), C1 (internal: keeps host full, loses host SWA -> host
    # tombstone), C2 (leaf). Then 4 full and 5 SWA pages are free. X survives.
    p = 4
    r = Rig(p, 4, host_full=6, host_swa=6)
    x, y, c = seq(4, 100), seq(4, 200), seq(8, 300)
    r.run(y)
    r.run(x)
    kv = r.admit(c)
    r.compute(kv, 4)
    r.commit(kv)  # C1 = [0, 4)
    r.compute(kv)
    r.finish(kv)  # C2 = [4, 8)
    c1, c2 = r.path(c)
    (xn,), (yn,) = r.path(x), r.path(y)
    assert r.host_used() == Need(16, 16)  # 4 pages of each
    r.release(r.admit(x + [1]))  # X is hit: most recent on the host
    # Y is older than C1, C2 (host times: Y, X, C1, C2, then X refreshed).
    z = seq(16, 400)
    kv = r.admit(z)
    r.compute(kv)
    r.finish(kv)  # Z's backup
    zn = r.path(z)
    assert all(n.host_full is not None for n in zn)
    assert yn.host_full is None and yn.value is not None  # evicted from host, still cached
    assert c1.host_full is not None and c1.host_swa is None  # host tombstone
    assert c2.host_full is None  # leaf: copy dropped
    assert xn.host_full is not None and xn.host_swa is not None
    c = r.tree.host_counters
    assert (c["host_evicted_full_tokens"], c["host_evicted_swa_tokens"]) == (8, 12)
    r.check()
    r.close()


def test_host_only_leaf_leaves_the_tree_when_evicted_from_host():
    p = 4
    r = Rig(p, 4, host_full=4, host_swa=4)
    a = seq(8, 500)
    r.run(a)
    r.evict(Need(10**6, 0))  # demoted: host only
    assert r.path(a) and all(n.value is None for n in r.path(a))
    r.run(seq(16, 600))  # needs all 4 host pages: A leaves the tree for good
    assert r.cache.match(a + [1]).host_prefix_len == 0 and r.path(a) == []
    assert all(n.host_full is not None for n in r.path(seq(16, 600)))
    r.check()
    r.close()


# ----------------------------------------------------------------------- load-back
@pytest.mark.parametrize("page, window", CONFIGS)
@pytest.mark.parametrize("keep_on_device", [0, 1])
def test_load_back_three_windows(page, window, keep_on_device):
    """A host segment three windows long: full KV for all of it, SWA for exactly the
    pages covering the last W - 1 positions; the rest of the segment stays a device
    tombstone. With keep_on_device, the first node stays on the device."""
    p = page
    r = Rig(page, window)
    n_tok = num_pages(3 * window + p, p) * p
    a = seq(n_tok, 5000)
    kv = r.admit(a)
    r.compute(kv, p)
    r.commit(kv)  # first node: [0, p)
    r.compute(kv)
    r.finish(kv)
    first = r.path(a)[0]
    if keep_on_device:
        r.release(r.admit(a[:p] + [1]))  # hit: the first node is the newest
        r.evict(Need(n_tok - p, 0))  # demotes everything but the first node
        assert first.value is not None
    else:
        r.evict(Need(10**6, 0))
    d0 = p if keep_on_device else 0
    on_device = {id(n) for n in r.path(a) if n.value is not None}
    m = r.cache.match(a + [3])
    assert (m.prefix_len, m.host_prefix_len) == (d0 if _window_ok(r, a, d0) else 0, n_tok)
    free = r.alloc.available()
    kv = r.admit(a + [3], m)
    assert kv.protected_len == n_tok
    swa_start = page_floor(max(0, n_tok - (window - 1)), p)
    c = r.tree.host_counters
    assert c["loaded_full_tokens"] == n_tok - d0
    assert c["loaded_swa_tokens"] == n_tok - swa_start
    assert r.alloc.available() == free - Need(n_tok - d0, n_tok - swa_start)
    r.verify(kv, n_tok)
    for n in r.path(a):  # loaded nodes below the window: device tombstones
        if id(n) not in on_device:
            assert n.swa_live == (n.end > swa_start)
    r.check([kv])
    r.release(kv)
    r.check()
    r.close()


def _window_ok(r: Rig, tokens: list[int], end: int) -> bool:
    """Whether the device alone serves an end at `end` (its window live)."""
    lo = max(0, end - (r.window - 1))
    return all(n.value is not None and n.swa_live
               for n in r.path(tokens) if n.start < end and n.end > lo)


# ------------------------------------------------------------------ the seed scenario
def test_seed_load_back_under_swa_pressure_evicts_no_full_kv():
    """SWA pool nearly exhausted by running requests, full pool with room: the load-back
    takes its window through SWA-only eviction (a cached node is tombstoned) and no full
    KV is evicted; gating on min(full, SWA) would have evicted full KV for nothing."""
    p, w = 4, 8
    r = Rig(p, w, full_pages=64, swa_pages=14)
    x = seq(32, 100)
    r.run(x)
    r.evict(Need(10**6, 0))  # X on the host only
    y = seq(8, 900)
    r.run(y)  # cached, unlocked, live SWA: 2 pages of evictable SWA and full
    running = []
    for i in range(3):  # three running requests hold 12 SWA pages
        kv = r.admit(seq(16, 2000 + 100 * i))
        r.compute(kv)
        running.append(kv)
    assert r.alloc.available().swa == 0  # 14 = 2 (Y) + 12
    full_before, demoted = r.cache.evictable().full, r.tree.host_counters["demoted_tokens"]
    yn = r.path(y)
    kv = r.admit(x + [1])  # window [25, 32): 2 SWA pages needed, none free
    assert kv.protected_len == 32
    assert r.tree.host_counters["demoted_tokens"] == demoted, "full KV evicted for SWA"
    assert all(n.value is not None for n in yn), "Y's full KV evicted for an SWA shortfall"
    assert not any(n.swa_live for n in yn)  # ... only its SWA went (tombstoned)
    assert r.cache.evictable().full == full_before  # no full page left the tree
    r.verify(kv, 32)
    r.check(running + [kv])
    r.close()


def test_reverse_load_back_under_full_pressure_evicts_full_only_as_needed():
    """Full pool short, SWA ample: full KV is evicted only as far as needed (the two
    oldest leaves, demoted: they are backed up) and nothing is SWA-evicted."""
    p, w = 4, 8
    r = Rig(p, w, full_pages=16, swa_pages=64)
    x = seq(16, 100)
    r.run(x)
    r.evict(Need(10**6, 0))  # X: 4 pages, host only
    olds = [seq(4, 300 + 10 * i) for i in range(3)]
    for o in olds:
        r.run(o)  # three 1-page leaves, oldest first, on the device and backed up
    running = r.admit(seq(44, 700))
    r.compute(running)  # 11 pages: 14 of 16 full pages used, 2 free
    assert r.alloc.available().full == 8
    demoted = r.tree.host_counters["demoted_tokens"]
    kv = r.admit(x + [1])  # load needs 4 full pages: 2 short
    assert kv.protected_len == 16
    assert r.tree.host_counters["demoted_tokens"] - demoted == 8  # exactly two leaves
    (l1,), (l2,), (l3,) = (r.path(o) for o in olds)
    assert l1.value is None and l2.value is None  # the oldest two, demoted
    assert l3.value is not None and l3.swa_live  # untouched, SWA included
    swa_start = page_floor(16 - (w - 1), p)
    tombs = [n for n in r.tree.nodes() if n.value is not None and not n.swa_live]
    assert all(n in r.path(x) and n.end <= swa_start for n in tombs), "SWA was evicted"
    assert r.tree.host_counters["loaded_swa_tokens"] == 16 - swa_start
    r.verify(kv, 16)
    r.check([running, kv])
    r.close()


@pytest.mark.parametrize("page, window", CONFIGS)
def test_host_swa_kept_at_anchors_trimmed_along_chains(page, window):
    """Host SWA is kept in the windows before the prompt end and the finish end (where
    later requests match), and dropped along the chain of decode pages between them:
    after demotion, the same prompt and the continuation both load back from the host."""
    p = page
    r = Rig(page, window)
    n_prompt = 4 * p
    n_total = n_prompt + page_floor(3 * window + 2 * p, p)
    toks = seq(n_total + 1, 7000)
    kv = r.admit(toks[:n_prompt])
    r.compute(kv)
    r.commit(kv, anchor=True)  # the prompt end
    while kv.kv_len < n_total:  # decode, committing every filled page
        kv.token_ids.append(toks[kv.kv_len])
        r.compute(kv, kv.kv_len + 1)
        if kv.kv_len % p == 0:
            r.commit(kv)
    r.finish(kv)
    r.check()

    def kept(end: int):
        return [n for n in r.path(toks) if n.end > end - window - p and n.end <= end]

    held = [n for n in r.path(toks) if n.host_swa is not None]
    assert set(map(id, held)) == set(map(id, kept(n_prompt) + kept(n_total)))
    assert r.tree.host_counters["host_trimmed_swa_tokens"] > 0
    r.evict(Need(10**6, 0))
    for end in (n_prompt, n_total):  # both anchors load back from the host
        m = r.cache.match(toks[: end + 1])
        assert (m.prefix_len, m.host_prefix_len) == (0, end)
        got = r.admit(toks[: end + 1], m)
        assert got.protected_len == end
        r.verify(got, end)
        r.release(got)
        r.evict(Need(10**6, 0))
        r.check()
    r.close()
