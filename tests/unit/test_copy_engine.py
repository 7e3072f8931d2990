"""CopyEngine: device<->host page copies reproduce bytes exactly; validation; counters.

Here both tiers live on the CPU, so every copy completes at submit.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from swakv.config import AttentionSpec, AttnKind, KVLayout
from swakv.memory.allocator import InvalidFree, SWAAllocator
from swakv.memory.copy_engine import (
    CopyBatch,
    CopyCounters,
    CopyDirection,
    CopyEngine,
    InvalidCopy,
    PageCopy,
    PoolMismatch,
    merge_runs,
)
from swakv.memory.host_pool import HostKVPool, HostPoolSizes, OutOfHostKVMemory
from swakv.memory.kv_pool import KVPool
from swakv.memory.pages import Need

BACKUP, LOAD = CopyDirection.BACKUP, CopyDirection.LOAD
# sliding, full, sliding: the SWA pool has a different head shape than the full pool
SW = AttentionSpec(AttnKind.SLIDING, 1, 4, 10_000.0, window=6)
FULL = AttentionSpec(AttnKind.FULL, 2, 8, 1_000_000.0)


def layout(dtype: torch.dtype = torch.float32) -> KVLayout:
    return KVLayout(layers=(SW, FULL, SW), dtype=dtype)


def bytes_per_token(dtype: torch.dtype, sliding: bool) -> int:
    return layout(dtype).bytes_per_token(sliding)


def make(page: int, dtype=torch.float32, dev_pages=(20, 12), host_pages=(16, 10), seed=0):
    """Device pool filled with random KV in every slot; host pool filled with -7."""
    dev = KVPool(layout(dtype), SWAAllocator(dev_pages[0], dev_pages[1], page))
    gen = torch.Generator().manual_seed(seed)
    for t in dev.full_k + dev.full_v + dev.swa_k + dev.swa_v:
        t.copy_(torch.randn(t.shape, generator=gen).to(dtype))
    host = HostKVPool(layout(dtype), HostPoolSizes(host_pages[0], host_pages[1], page, 0, 0))
    for t in host.full_k + host.full_v + host.swa_k + host.swa_v:
        t.fill_(-7.0)  # host pools start uninitialised (maybe NaN); make "untouched" comparable
    return dev, host, CopyEngine(dev, host)


def tensors(pool, kind: str) -> list[torch.Tensor]:
    return pool.full_k + pool.full_v if kind == "full" else pool.swa_k + pool.swa_v


def page_bytes(pool, kind: str, page: int, page_size: int) -> list[torch.Tensor]:
    return [t[page * page_size:(page + 1) * page_size].clone() for t in tensors(pool, kind)]


def assert_pages_equal(a_pool, a_pages, b_pool, b_pages, kind: str, page_size: int) -> None:
    for a, b in zip(a_pages, b_pages):
        for x, y in zip(page_bytes(a_pool, kind, int(a), page_size),
                        page_bytes(b_pool, kind, int(b), page_size)):
            assert torch.equal(x, y), f"{kind} page {a} != page {b}"


# (full device pages, full host pages, swa device pages, swa host pages)
CASES = {
    "contiguous": ([3, 4, 5, 6], [1, 2, 3, 4], [2, 3], [5, 6]),
    "scattered": ([9, 2, 17, 5, 6], [4, 1, 2, 9, 3], [11, 1, 7], [2, 10, 4]),
    "runs": ([1, 2, 3, 10, 11, 20], [5, 6, 7, 1, 2, 16], [4, 5, 12], [8, 9, 1]),
    "single_page": ([20], [16], [12], [10]),
    "full_only": ([7, 8], [3, 9], [], []),
    "empty": ([], [], [], []),
}


@pytest.mark.parametrize("page", [1, 4, 16])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_reproduces_bytes(page: int, case: str, dtype: torch.dtype) -> None:
    full_dev, full_host, swa_dev, swa_host = CASES[case]
    dev, host, engine = make(page, dtype)
    before = {k: page_bytes(dev, k, 0, page) for k in ("full", "swa")}
    h = engine.submit(CopyBatch(BACKUP, PageCopy(full_dev, full_host), PageCopy(swa_dev, swa_host)))
    assert h.done()
    h.wait()
    h.wait_stream()  # complete: a no-op
    assert_pages_equal(dev, full_dev, host, full_host, "full", page)
    assert_pages_equal(dev, swa_dev, host, swa_host, "swa", page)
    # load back into other device pages (reversed order, shifted), then compare to originals
    full_back = [((p + 3) % 20) + 1 for p in full_dev][::-1]
    swa_back = [((p + 5) % 12) + 1 for p in swa_dev][::-1]
    originals = {("full", p): page_bytes(dev, "full", p, page) for p in full_dev}
    originals |= {("swa", p): page_bytes(dev, "swa", p, page) for p in swa_dev}
    h = engine.submit(CopyBatch(LOAD, PageCopy(full_host[::-1], full_back),
                                PageCopy(swa_host[::-1], swa_back)))
    assert h.done()
    for kind, src, dst in (("full", full_dev[::-1], full_back), ("swa", swa_dev[::-1], swa_back)):
        for s, d in zip(src, dst):
            for x, y in zip(originals[(kind, s)], page_bytes(dev, kind, d, page)):
                assert torch.equal(x, y)
    for kind in ("full", "swa"):  # padding page untouched
        for x, y in zip(before[kind], page_bytes(dev, kind, 0, page)):
            assert torch.equal(x, y)
    bf, bs = bytes_per_token(dtype, False), bytes_per_token(dtype, True)
    n_full, n_swa = len(full_dev) * page, len(swa_dev) * page
    assert engine.counters == CopyCounters(
        backup_full_bytes=n_full * bf, backup_swa_bytes=n_swa * bs,
        load_full_bytes=n_full * bf, load_swa_bytes=n_swa * bs,
        num_backup_batches=1, num_load_batches=1)
    assert engine.num_in_flight() == 0


def test_copy_leaves_other_pages_untouched() -> None:
    dev, host, engine = make(4)
    host_before = [t.clone() for t in tensors(host, "full") + tensors(host, "swa")]
    engine.submit(CopyBatch(BACKUP, PageCopy([2, 9], [3, 7]), PageCopy([5], [4])))
    for kind, copied in (("full", {3, 7}), ("swa", {4})):
        n = host.num_full_pages if kind == "full" else host.num_swa_pages
        offset = 0 if kind == "full" else len(tensors(host, "full"))
        for i, t in enumerate(tensors(host, kind)):
            for p in range(n + 1):
                same = torch.equal(t[p * 4:(p + 1) * 4], host_before[offset + i][p * 4:(p + 1) * 4])
                assert same == (p not in copied), (kind, p)


def test_repeated_sources_fan_out() -> None:
    dev, host, engine = make(4)
    engine.submit(CopyBatch(BACKUP, PageCopy([6, 6, 6], [1, 5, 2])))
    assert_pages_equal(dev, [6, 6, 6], host, [1, 5, 2], "full", 4)
    assert engine.counters.backup_full_bytes == 3 * 4 * bytes_per_token(torch.float32, False)
    assert engine.counters.bytes_copied(BACKUP, "full") == engine.counters.backup_full_bytes
    assert engine.counters.bytes_copied(LOAD, "swa") == 0


@pytest.mark.parametrize("src, dst, expected", [
    ([], [], []),
    ([5], [2], [[5, 2, 1]]),
    ([3, 4, 5, 9], [1, 2, 7, 8], [[3, 1, 2], [5, 7, 1], [9, 8, 1]]),
    ([1, 2, 3], [4, 5, 6], [[1, 4, 3]]),
    ([3, 2, 1], [1, 2, 3], [[3, 1, 1], [2, 2, 1], [1, 3, 1]]),
    ([7, 7], [1, 2], [[7, 1, 1], [7, 2, 1]]),
    ([1, 2, 10, 11], [8, 9, 3, 4], [[1, 8, 2], [10, 3, 2]]),
])
def test_merge_runs(src, dst, expected) -> None:
    runs = merge_runs(np.array(src, dtype=np.int64), np.array(dst, dtype=np.int64))
    assert runs.dtype == np.int64 and runs.shape == (len(expected), 3)
    assert runs.tolist() == expected


@pytest.mark.parametrize("direction, full, swa, match", [
    (BACKUP, PageCopy([1, 2], [1]), PageCopy(), "2 source pages but 1"),
    (BACKUP, PageCopy([0], [1]), PageCopy(), r"source page ids must lie in \[1, 20\]"),
    (BACKUP, PageCopy([21], [1]), PageCopy(), r"source page ids must lie in \[1, 20\]"),
    (BACKUP, PageCopy([1], [17]), PageCopy(), r"destination page ids must lie in \[1, 16\]"),
    (BACKUP, PageCopy([1], [2]), PageCopy([13], [1]), r"swa: source .* \[1, 12\]"),
    (BACKUP, PageCopy([1], [2]), PageCopy([1], [11]), r"swa: destination .* \[1, 10\]"),
    (LOAD, PageCopy([17], [1]), PageCopy(), r"source page ids must lie in \[1, 16\]"),
    (LOAD, PageCopy([1], [21]), PageCopy(), r"destination page ids must lie in \[1, 20\]"),
    (LOAD, PageCopy([1, 2], [3, 3]), PageCopy(), "destination pages repeated"),
    (LOAD, PageCopy([1], [0]), PageCopy(), "destination page ids"),
])
def test_invalid_batches_copy_nothing(direction, full, swa, match) -> None:
    dev, host, engine = make(4)
    snap = [t.clone() for t in tensors(dev, "full") + tensors(dev, "swa")
            + tensors(host, "full") + tensors(host, "swa")]
    with pytest.raises(InvalidCopy, match=match):
        engine.submit(CopyBatch(direction, full, swa))
    after = tensors(dev, "full") + tensors(dev, "swa") + tensors(host, "full") + tensors(host, "swa")
    assert all(torch.equal(a, b) for a, b in zip(snap, after))
    assert engine.counters == CopyCounters()


def test_direction_must_be_an_enum() -> None:
    _, _, engine = make(4)
    with pytest.raises(InvalidCopy, match="CopyDirection"):
        engine.submit(CopyBatch("backup", PageCopy([1], [1])))  # type: ignore[arg-type]


def test_host_pool_must_mirror_device_pool() -> None:
    dev = KVPool(layout(), SWAAllocator(4, 4, 4))
    other = KVLayout(layers=(SW, AttentionSpec(AttnKind.FULL, 1, 8, 1e6), SW))
    with pytest.raises(PoolMismatch, match="full host pool"):
        CopyEngine(dev, HostKVPool(other, HostPoolSizes(4, 4, 4, 0, 0)))
    with pytest.raises(PoolMismatch, match="full host pool"):
        CopyEngine(dev, HostKVPool(layout(torch.bfloat16), HostPoolSizes(4, 4, 4, 0, 0)))
    with pytest.raises(PoolMismatch, match="page sizes differ"):
        CopyEngine(dev, HostKVPool(layout(), HostPoolSizes(4, 4, 2, 0, 0)))


def test_page_copy_normalises_ids() -> None:
    c = PageCopy(np.array([3, 1], dtype=np.int32), [2, 4])
    assert c.src_pages.dtype == c.dst_pages.dtype == torch.int64
    assert c.src_pages.tolist() == [3, 1] and c.dst_pages.tolist() == [2, 4]
    assert c.num_pages == 2 and PageCopy().num_pages == 0


def test_cpu_engine_has_no_stream() -> None:
    dev, _, engine = make(4)
    assert engine.device == torch.device("cpu") == dev.device
    assert engine._stream is None
    h = engine.submit(CopyBatch(LOAD))
    assert h.done() and engine.num_in_flight() == 0
    engine.wait_all()
    assert engine.counters.num_load_batches == 1


# ---- state machine ---------------------------------------------------------------------

class HostTierMachine(RuleBasedStateMachine):
    """Random alloc / free / device writes / backups / loads against a reference model.

    Model: per host pool the FIFO free list (a deque) and the allocated pages; the bytes of
    every device page and of every allocated host page that a backup wrote (page -> list of
    per-layer-tensor bytes); the counters. The real pools must agree after every step.
    """

    DEV_PAGES = {"full": 10, "swa": 6}
    HOST_PAGES = {"full": 8, "swa": 5}

    def __init__(self, page: int) -> None:
        super().__init__()
        self.P = page
        self.dev, self.host, self.engine = make(
            page, dev_pages=(10, 6), host_pages=(8, 5), seed=page)
        self.free_ref = {k: deque(range(1, n + 1)) for k, n in self.HOST_PAGES.items()}
        self.allocated: dict[str, set[int]] = {"full": set(), "swa": set()}
        self.dev_ref = {(k, p): page_bytes(self.dev, k, p, page)
                        for k, n in self.DEV_PAGES.items() for p in range(n + 1)}
        self.host_ref: dict[tuple[str, int], list[torch.Tensor]] = {}
        self.counters = CopyCounters()
        self.slot_bytes = {"full": bytes_per_token(torch.float32, False),
                           "swa": bytes_per_token(torch.float32, True)}

    def snapshot(self) -> tuple:
        h = self.host
        return (h.full.free_pages().tolist(), h.swa.free_pages().tolist(),
                h.full.is_free_mask().tolist(), h.swa.is_free_mask().tolist())

    @rule(num_full=st.integers(0, 4), num_swa=st.integers(0, 3))
    def alloc(self, num_full: int, num_swa: int) -> None:
        fits = num_full <= len(self.free_ref["full"]) and num_swa <= len(self.free_ref["swa"])
        before = self.snapshot()
        try:
            got = self.host.alloc(num_full, num_swa)
        except OutOfHostKVMemory:
            assert not fits and self.snapshot() == before
            return
        assert fits
        for kind, pages, n in (("full", got.full_pages, num_full), ("swa", got.swa_pages, num_swa)):
            expected = [self.free_ref[kind].popleft() for _ in range(n)]
            assert pages.tolist() == expected
            self.allocated[kind].update(expected)

    @rule(data=st.data(), corrupt=st.sampled_from([None, None, "repeat", "not_allocated"]))
    def free(self, data, corrupt: str | None) -> None:
        lists = {k: data.draw(st.lists(st.sampled_from(sorted(self.allocated[k]) or [0]),
                                       unique=True, max_size=4), label=f"free_{k}")
                 for k in ("full", "swa")}
        lists = {k: [p for p in v if p in self.allocated[k]] for k, v in lists.items()}
        kind = data.draw(st.sampled_from(["full", "swa"]), label="corrupt_kind")
        if corrupt == "repeat" and lists[kind]:
            lists[kind].append(lists[kind][0])
        elif corrupt == "not_allocated" and self.free_ref[kind]:
            lists[kind].append(self.free_ref[kind][0])
        else:
            corrupt = None
        before = self.snapshot()
        if corrupt:
            with pytest.raises(InvalidFree):
                self.host.free(torch.tensor(lists["full"], dtype=torch.int64),
                               torch.tensor(lists["swa"], dtype=torch.int64))
            assert self.snapshot() == before
            return
        self.host.free(torch.tensor(lists["full"], dtype=torch.int64),
                       torch.tensor(lists["swa"], dtype=torch.int64))
        for k, pages in lists.items():
            self.free_ref[k].extend(pages)
            self.allocated[k].difference_update(pages)
            for p in pages:
                self.host_ref.pop((k, p), None)

    @rule(kind=st.sampled_from(["full", "swa"]), data=st.data(), seed=st.integers(0, 2**16))
    def write_device(self, kind: str, data, seed: int) -> None:
        page = data.draw(st.integers(1, self.DEV_PAGES[kind]), label="device_page")
        gen = torch.Generator().manual_seed(seed)
        for t in tensors(self.dev, kind):
            rows = t[page * self.P:(page + 1) * self.P]
            rows.copy_(torch.randn(rows.shape, generator=gen))
        self.dev_ref[(kind, page)] = page_bytes(self.dev, kind, page, self.P)

    def draw_pages(self, data, pages: list[int], label: str) -> list[int]:
        """A random ordered selection of distinct pages from `pages` (at most 5)."""
        if not pages:
            return []
        n = data.draw(st.integers(0, min(5, len(pages))), label=f"num_{label}")
        return data.draw(st.permutations(pages), label=label)[:n]

    def draw_copy(self, data, kind: str, backup: bool) -> PageCopy:
        dev_pages = list(range(1, self.DEV_PAGES[kind] + 1))
        if backup:  # distinct allocated host destinations, any device sources
            dst = self.draw_pages(data, sorted(self.allocated[kind]), f"{kind}_host_dst")
            src = data.draw(st.lists(st.sampled_from(dev_pages), min_size=len(dst),
                                     max_size=len(dst)), label=f"{kind}_device_src")
            return PageCopy(src, dst)
        # any host pages a backup wrote as sources, distinct device destinations
        known = sorted(p for k, p in self.host_ref if k == kind)
        src = data.draw(st.lists(st.sampled_from(known), min_size=min(len(known), 1),
                                 max_size=5) if known else st.just([]), label=f"{kind}_host_src")
        dst = data.draw(st.permutations(dev_pages), label=f"{kind}_device_dst")[: len(src)]
        return PageCopy(src, dst)

    def copy(self, data, direction: CopyDirection) -> None:
        backup = direction is BACKUP
        batch = CopyBatch(direction, self.draw_copy(data, "full", backup),
                          self.draw_copy(data, "swa", backup))
        handle = self.engine.submit(batch)
        assert handle.done()
        for kind, c in (("full", batch.full), ("swa", batch.swa)):
            src_ref, dst_ref = ("dev", "host") if backup else ("host", "dev")
            refs = {"dev": self.dev_ref, "host": self.host_ref}
            for s, d in zip(c.src_pages.tolist(), c.dst_pages.tolist()):
                refs[dst_ref][(kind, d)] = refs[src_ref][(kind, s)]
            name = f"{direction.value}_{kind}_bytes"
            setattr(self.counters, name, getattr(self.counters, name)
                    + c.num_pages * self.P * self.slot_bytes[kind])
        name = f"num_{direction.value}_batches"
        setattr(self.counters, name, getattr(self.counters, name) + 1)

    @precondition(lambda self: self.allocated["full"] or self.allocated["swa"])
    @rule(data=st.data())
    def backup(self, data) -> None:
        self.copy(data, BACKUP)

    @precondition(lambda self: self.host_ref)
    @rule(data=st.data())
    def load(self, data) -> None:
        self.copy(data, LOAD)

    @invariant()
    def agrees_with_model(self) -> None:
        self.host.check_integrity()
        for kind in ("full", "swa"):
            assert getattr(self.host, kind).free_pages().tolist() == list(self.free_ref[kind])
        assert self.host.available_pages() == Need(len(self.free_ref["full"]),
                                                   len(self.free_ref["swa"]))
        for refs, pool in ((self.dev_ref, self.dev), (self.host_ref, self.host)):
            for (kind, p), expected in refs.items():
                got = page_bytes(pool, kind, p, self.P)
                assert all(torch.equal(x, y) for x, y in zip(expected, got)), (kind, p)
        assert self.engine.counters == self.counters
        assert self.engine.num_in_flight() == 0


SETTINGS = settings(max_examples=25, stateful_step_count=30, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("page", [1, 4, 16])
def test_host_tier_state_machine(page: int) -> None:
    run_state_machine_as_test(lambda: HostTierMachine(page), settings=SETTINGS)
