"""Random operation sequences against SWAAllocator, checked against a reference model.

Reference model, per live request: its committed length L, the full page of every
position (recorded when the allocator hands the slots out; partial pages must be
continued, never duplicated) and its frontier (positions < frontier have no SWA KV,
positions >= frontier have live SWA KV). From that the model knows how many pages of
each pool must be in use and which pages must be free. After every step the
allocator must agree: slots, translate/is_swa_mapped of every position, available(),
free lists, and check_integrity(). OutOfKVMemory must be the only failure, raised
exactly when the model says the request does not fit, and must change nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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

from swakv.memory.allocator import InvalidFree, OutOfKVMemory, SWAAllocator
from swakv.memory.pages import Need, max_frontier, num_pages, swa_tail_len, swa_tail_start

I64 = torch.int64
NUM_FULL_PAGES = 14
NUM_SWA_PAGES = 9
MAX_PAGES_PER_REQ = 6


@dataclass
class Req:
    """SWA of page i is live iff (i * P >= frontier) != (i in flipped): `move_swa` flips
    pages against the plain frontier rule (a donor loses, a receiver gains)."""

    page: int
    slots: list[int] = field(default_factory=list)  # full slot of each position
    frontier: int = 0  # page aligned; SWA of positions < frontier freed
    flipped: set[int] = field(default_factory=set)

    @property
    def length(self) -> int:
        return len(self.slots)

    def page_live(self, i: int) -> bool:
        return (i * self.page >= self.frontier) != (i in self.flipped)

    def set_live(self, i: int, live: bool) -> None:
        if self.page_live(i) != live:
            self.flipped ^= {i}

    def num_live_pages(self) -> int:
        return sum(self.page_live(i) for i in range(num_pages(self.length, self.page)))

    def advance(self, new_frontier: int) -> None:
        """Frontier moves to new_frontier: pages below it lose SWA (free_swa)."""
        P = self.page
        for i in range(self.frontier // P, new_frontier // P):
            self.flipped.discard(i)
        self.frontier = new_frontier

    def live_mask(self) -> list[bool]:
        return [self.page_live(pos // self.page) for pos in range(self.length)]


def snapshot(a: SWAAllocator) -> tuple:
    """Everything an allocation may change: free lists, free masks, mapping, sizes."""
    return (
        a.full.pages.free_pages().tolist(),
        a.full.pages.is_free_mask().tolist(),
        a.swa.free_pages().tolist(),
        a.swa.is_free_mask().tolist(),
        a.full_to_swa_page.tolist(),
        a.available(),
    )


class AllocatorMachine(RuleBasedStateMachine):
    def __init__(self, page: int, window: int) -> None:
        super().__init__()
        self.P = page
        self.W = window
        self.a = SWAAllocator(NUM_FULL_PAGES, NUM_SWA_PAGES, page)
        self.reqs: dict[int, Req] = {}
        self.next_id = 0
        self.ooms = 0

    # ---- reference counts ---------------------------------------------------------
    def ref_used(self) -> tuple[int, int]:
        P = self.P
        full = sum(num_pages(r.length, P) for r in self.reqs.values())
        swa = sum(r.num_live_pages() for r in self.reqs.values())
        return full, swa

    def ref_fits(self, full_pages: int, swa_pages: int) -> bool:
        used_full, used_swa = self.ref_used()
        return full_pages <= NUM_FULL_PAGES - used_full and swa_pages <= NUM_SWA_PAGES - used_swa

    def expect_oom(self, fn, full_pages: int, swa_pages: int):
        """Run an allocation; OOM iff the model says it does not fit, and atomically."""
        fits = self.ref_fits(full_pages, swa_pages)
        before = snapshot(self.a)
        try:
            out = fn()
        except OutOfKVMemory as e:
            assert not fits, "allocator refused an allocation that fits"
            assert e.need == Need(full_pages * self.P, swa_pages * self.P)
            assert snapshot(self.a) == before, "failed allocation changed state"
            self.ooms += 1
            return None
        assert fits, "allocator accepted an allocation that does not fit"
        return out

    def add_request(self, req: Req, out: torch.Tensor) -> None:
        """Register a newly allocated request after checking its fresh slots."""
        slots = out.tolist()
        self.check_new_slots(req, 0, slots)
        req.slots = slots
        self.reqs[self.next_id] = req
        self.next_id += 1

    def check_new_slots(self, req: Req, start: int, slots: list[int]) -> None:
        """Slots for positions [start, start + len(slots)): page-structured, continuing."""
        P = self.P
        for i, s in enumerate(slots):
            pos = start + i
            assert s % P == pos % P, "offset in page must equal position offset"
            if pos % P:  # same page as the previous position
                prev = req.slots[pos - 1] if pos - 1 < start else slots[i - 1]
                assert s == prev + 1
            else:
                assert s // P >= 1, "page 0 handed out"

    def live(self) -> list[int]:
        return sorted(self.reqs)

    # ---- rules -----------------------------------------------------------------------
    @rule(data=st.data())
    def arrive(self, data) -> None:
        P = self.P
        n = data.draw(st.integers(1, MAX_PAGES_PER_REQ * P), label="prompt_len")
        k = num_pages(n, P)
        out = self.expect_oom(lambda: self.a.alloc_extend(0, n, None), k, k)
        if out is None:
            return
        self.add_request(Req(P), out)

    @precondition(lambda self: self.reqs)
    @rule(data=st.data())
    def extend(self, data) -> None:
        """Next prompt chunk: continue from a (possibly non-aligned) prefix."""
        P = self.P
        rid = data.draw(st.sampled_from(self.live()), label="req")
        req = self.reqs[rid]
        L = req.length
        room = MAX_PAGES_PER_REQ * P + P - L
        if room <= 0:
            return
        n = data.draw(st.integers(0, room), label="extend_by")
        k = num_pages(L + n, P) - num_pages(L, P)
        out = self.expect_oom(lambda: self.a.alloc_extend(L, L + n, req.slots[-1]), k, k)
        if out is None:
            return
        slots = out.tolist()
        assert len(slots) == n
        self.check_new_slots(req, L, slots)
        req.slots += slots

    @precondition(lambda self: self.reqs)
    @rule(data=st.data())
    def decode(self, data) -> None:
        P = self.P
        ids = data.draw(
            st.lists(st.sampled_from(self.live()), min_size=1, unique=True), label="batch"
        )
        lens = [self.reqs[i].length for i in ids]
        k = sum(1 for n in lens if n % P == 0)
        cur = torch.tensor(lens, dtype=I64)
        last = torch.tensor([self.reqs[i].slots[-1] for i in ids], dtype=I64)
        out = self.expect_oom(lambda: self.a.alloc_decode(cur, last), k, k)
        if out is None:
            return
        slots = out.tolist()
        assert len(slots) == len(ids)
        for i, s in zip(ids, slots):
            req = self.reqs[i]
            self.check_new_slots(req, req.length, [s])
            req.slots.append(s)

    @precondition(lambda self: self.reqs)
    @rule(data=st.data())
    def advance_frontier(self, data) -> None:
        ids = data.draw(st.lists(st.sampled_from(self.live()), min_size=1, unique=True))
        batched = data.draw(st.booleans(), label="batched")
        plan = []
        for i in ids:
            req = self.reqs[i]
            new = max_frontier(req.length, self.W, self.P)
            if new > req.frontier:
                plan.append((req, new))
        free_before = self.a.swa_available()
        if batched:
            with self.a.batch_free():
                for req, new in plan:
                    self.a.free_swa(torch.tensor(req.slots[req.frontier : new], dtype=I64))
                assert self.a.swa_available() == free_before  # applied at exit
        else:
            for req, new in plan:
                self.a.free_swa(torch.tensor(req.slots[req.frontier : new], dtype=I64))
        for req, new in plan:
            req.advance(new)

    @rule(data=st.data())
    def arrive_with_swa_tail(self, data) -> None:
        P = self.P
        L = data.draw(st.integers(1, MAX_PAGES_PER_REQ * P), label="tail_seq_len")
        tail = swa_tail_len(L, self.W, P)
        start = swa_tail_start(L, self.W, P)
        n_full = num_pages(L, P)
        out = self.expect_oom(
            lambda: self.a.alloc_extend_swa_tail(L, tail), n_full, n_full - start // P
        )
        if out is None:
            return
        self.add_request(Req(P, frontier=start), out)

    @precondition(lambda self: self.reqs)
    @rule(data=st.data())
    def finish(self, data) -> None:
        ids = data.draw(st.lists(st.sampled_from(self.live()), min_size=1, unique=True))
        mode = data.draw(st.sampled_from(["one_by_one", "batched", "batched_with_swa"]))
        if mode == "one_by_one":
            for i in ids:
                self.a.free(torch.tensor(self.reqs.pop(i).slots, dtype=I64))
            return
        survivors = [i for i in self.live() if i not in ids]
        with self.a.batch_free():
            for i in ids:
                self.a.free(torch.tensor(self.reqs[i].slots, dtype=I64))
            if mode == "batched_with_swa":
                for i in survivors:  # frontier advances in the same step
                    req = self.reqs[i]
                    new = max_frontier(req.length, self.W, self.P)
                    if new > req.frontier:
                        self.a.free_swa(torch.tensor(req.slots[req.frontier : new], dtype=I64))
                        req.advance(new)
        for i in ids:
            del self.reqs[i]

    @precondition(lambda self: self.reqs)
    @rule(data=st.data())
    def double_free_is_refused(self, data) -> None:
        """A free naming a page twice (in one call, or across calls of one batch) raises
        InvalidFree and changes nothing."""
        rid = data.draw(st.sampled_from(self.live()), label="req")
        slots = torch.tensor(self.reqs[rid].slots, dtype=I64)
        k = data.draw(st.integers(0, len(slots) - 1), label="repeat_at")
        how = data.draw(st.sampled_from(["in_call", "in_batch", "swa_in_batch"]), label="how")
        before = snapshot(self.a)
        try:
            if how == "in_call":
                self.a.free(torch.cat([slots, slots[k : k + 1]]))
            else:
                fn = self.a.free if how == "in_batch" else self.a.free_swa
                with self.a.batch_free():
                    fn(slots)
                    fn(slots[k : k + 1])
        except InvalidFree:
            pass
        else:
            mapped = bool(self.a.is_swa_mapped(slots[k : k + 1]).all())
            assert how == "swa_in_batch" and not mapped, "a repeated free was accepted"
            return
        assert snapshot(self.a) == before, "a refused free changed state"

    @precondition(lambda self: len(self.reqs) >= 2)
    @rule(data=st.data())
    def move_swa(self, data) -> None:
        """Tombstone revival: a donor's live SWA pages move to a receiver's full pages
        below its frontier (equal page-aligned spans); free lists do not change."""
        P = self.P
        src_id, dst_id = data.draw(
            st.lists(st.sampled_from(self.live()), min_size=2, max_size=2, unique=True))
        src, dst = self.reqs[src_id], self.reqs[dst_id]
        src_pages = [i for i in range(src.length // P) if src.page_live(i)]
        dst_pages = [i for i in range(num_pages(dst.length, P)) if not dst.page_live(i)]
        n = min(len(src_pages), len(dst_pages))
        if n == 0:
            return
        n = data.draw(st.integers(1, n), label="num_pages")
        src_pages, dst_pages = src_pages[:n], dst_pages[:n]
        src_slots = torch.tensor([src.slots[i * P + o] for i in src_pages for o in range(P)],
                                 dtype=I64)
        dst_slots = torch.tensor([dst.slots[i * P + o] for i in dst_pages for o in range(P)],
                                 dtype=I64)
        moved = self.a.translate(src_slots)
        free_before = self.a.available()
        self.a.move_swa(dst_slots, src_slots)
        assert torch.equal(self.a.translate(dst_slots), moved)
        assert self.a.available() == free_before
        for i in src_pages:
            src.set_live(i, False)
        for i in dst_pages:
            dst.set_live(i, True)

    # ---- checks --------------------------------------------------------------------
    @invariant()
    def agrees_with_model(self) -> None:
        a, P = self.a, self.P
        a.check_integrity()
        used_full, used_swa = self.ref_used()
        assert a.available() == Need((NUM_FULL_PAGES - used_full) * P, (NUM_SWA_PAGES - used_swa) * P)
        all_full_pages: set[int] = set()
        all_swa: list[int] = []
        for req in self.reqs.values():
            slots = torch.tensor(req.slots, dtype=I64)
            pages = set((slots // P).tolist())
            assert len(pages) == num_pages(req.length, P)
            assert not (pages & all_full_pages), "two requests share a full page"
            all_full_pages |= pages
            live = torch.tensor(req.live_mask(), dtype=torch.bool)
            assert a.is_swa_mapped(slots).tolist() == live.tolist()
            tr = a.translate(slots)
            assert (tr[~live] < P).all(), "positions without SWA must translate to page 0"
            live_tr = tr[live]
            assert (live_tr >= P).all()
            assert (live_tr % P == slots[live] % P).all(), "page congruence"
            all_swa += live_tr.tolist()
        assert len(all_swa) == len(set(all_swa)), "two live positions share an SWA slot"
        free_full = set(a.full.pages.free_pages().tolist())
        assert free_full == set(range(1, NUM_FULL_PAGES + 1)) - all_full_pages
        live_swa_pages = {s // P for s in all_swa}
        assert len(live_swa_pages) == used_swa
        assert set(a.swa.free_pages().tolist()) == set(range(1, NUM_SWA_PAGES + 1)) - live_swa_pages

    def teardown(self) -> None:
        with self.a.batch_free():
            for req in self.reqs.values():
                self.a.free(torch.tensor(req.slots, dtype=I64))
        self.reqs.clear()
        assert self.a.available() == self.a.total()
        assert self.a.full.pages.num_free == NUM_FULL_PAGES
        assert self.a.swa.num_free == NUM_SWA_PAGES
        assert not bool((self.a.full_to_swa_page != 0).any())
        self.a.check_integrity()


SETTINGS = settings(
    max_examples=25,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@pytest.mark.parametrize("page", [1, 4, 16])
@pytest.mark.parametrize("window", [3, 4, 16, 40])
def test_allocator_state_machine(page: int, window: int) -> None:
    run_state_machine_as_test(lambda: AllocatorMachine(page, window), settings=SETTINGS)
