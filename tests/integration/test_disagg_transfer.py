"""The PD data plane.

- The real Mooncake engine (TCP, P2P handshake) between this process (prefill) and a
  spawned decode process on 127.0.0.1, real KV pools on both sides, the control plane
  over pyzmq: destination bytes equal the source exactly, byte counters equal
  L x full bytes per token and swa_tail_len(L) x SWA bytes per token, and a dead peer
  fails the next write with TransferFailed.
- The missing-package / missing-libibverbs error paths (simulated import failures).
- Backend machinery (ordering, batching, counters, close) and the staging area, with
  an in-process backend that copies with memmove.
"""

from __future__ import annotations

import ctypes
import importlib.abc
import multiprocessing as mp
import sys
import threading
import time

import numpy as np
import pytest
import torch
import zmq

from swakv.config import AttentionSpec, AttnKind, KVLayout
from swakv.disagg import kv_transfer
from swakv.disagg.descriptors import (
    KVRegions,
    TransferDescriptors,
    kv_tensors,
    span_slot_ids,
    staged_nbytes,
)
from swakv.disagg.kv_transfer import (
    KVReceiver,
    KVSender,
    RemoteKV,
    StagingArea,
    StagingError,
    TransferMode,
    pack_kv,
    unpack_kv,
)
from swakv.disagg.messages import (
    Abort,
    Bootstrap,
    KVRegistration,
    KVWritten,
    Prealloc,
    Role,
    recv_message,
    send_message,
)
from swakv.disagg.plan import plan_transfer, row_pages, swa_row_pages
from swakv.disagg.transfer import (
    MooncakeBackend,
    TransferBackend,
    TransferBackendUnavailable,
    TransferClosed,
    TransferError,
    TransferFailed,
    load_mooncake_engine,
)
from swakv.memory.allocator import SWAAllocator
from swakv.memory.kv_pool import KVPool
from swakv.memory.pages import swa_tail_len
from swakv.sampling_params import SamplingParams

PAGE, WINDOW = 4, 10
FULL_PAGES, SWA_PAGES = 40, 24
# (request id, prompt length, sender mode): lengths on and off page boundaries
REQUESTS = [("r0", 37, "descriptors"), ("r1", 24, "staging"), ("r2", 41, "descriptors"),
            ("r3", 9, "staging")]


def layout() -> KVLayout:
    sw = AttentionSpec(AttnKind.SLIDING, 1, 8, 10_000.0, window=WINDOW)
    full = AttentionSpec(AttnKind.FULL, 2, 8, 1_000_000.0)
    return KVLayout(layers=(sw, sw, full, sw), dtype=torch.bfloat16)


def shuffled_pool(seed: int) -> KVPool:
    """Pools whose FIFO free lists are random permutations: every page taken alone,
    then freed in random order, so request page lists are scattered."""
    a = SWAAllocator(FULL_PAGES, SWA_PAGES, PAGE)
    rows = [a.alloc(PAGE) for _ in range(SWA_PAGES)]
    rows += [a.alloc_extend_swa_tail(PAGE, 0) for _ in range(FULL_PAGES - SWA_PAGES)]
    for i in np.random.default_rng(seed).permutation(len(rows)):
        a.free(rows[int(i)])
    return KVPool(layout(), a)


def pool_tensors(pool: KVPool) -> list[torch.Tensor]:
    return pool.full_k + pool.full_v + pool.swa_k + pool.swa_v


# ---- the decode process ---------------------------------------------------------------


def decode_worker(address: str) -> None:
    """Bootstrap, preallocate REQUESTS, complete them on KVWritten, dump the pools,
    then exit on Abort("bye")."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PAIR)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.connect(address)
    backend = MooncakeBackend()
    pool = shuffled_pool(seed=2)
    staging = StagingArea(1 << 20, pool.device)
    receiver = KVReceiver(backend, pool, staging)
    send_message(sock, Bootstrap("decode-0", Role.DECODE, address, backend.name,
                                 receiver.peer_info, KVRegistration.of(pool, staging.region)))
    pending = {}
    for request_id, seq_len, _ in REQUESTS:
        plan = plan_transfer(0, seq_len, WINDOW, PAGE)
        row = pool.allocator.alloc_extend_swa_tail(seq_len, swa_tail_len(seq_len, WINDOW, PAGE))
        full = row_pages(row, plan.full)
        swa = swa_row_pages(row, plan.swa, pool.allocator.full_to_swa_page)
        offset = receiver.reserve_staging(plan)
        pending[request_id] = (plan, full, swa, offset)
        send_message(sock, Prealloc(request_id, "decode-0", tuple(range(1, seq_len + 1)), 0,
                                    tuple(full.tolist()), tuple(swa.tolist()), offset,
                                    SamplingParams(temperature=0.0)))
    while pending:
        msg = recv_message(sock)
        assert isinstance(msg, KVWritten) and msg.first_token_id == 42
        plan, full, swa, offset = pending.pop(msg.request_id)
        assert msg.num_tokens == plan.seq_len
        receiver.complete(plan, full, swa, offset, msg.staged)
    assert staging.num_free_bytes == 1 << 20  # every lent range came back
    sock.send_multipart([t.contiguous().view(torch.uint8).numpy().tobytes()
                         for t in pool_tensors(pool)])
    assert recv_message(sock) == Abort("*", "bye")
    backend.close()
    sock.close()
    ctx.term()


# ---- the real engine between two processes ---------------------------------------------


@pytest.mark.slow
def test_mooncake_two_processes_move_exact_bytes(monkeypatch) -> None:
    monkeypatch.setenv("MC_LOG_LEVEL", "ERROR")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PAIR)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 60_000)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    child = mp.get_context("spawn").Process(target=decode_worker,
                                            args=(f"tcp://127.0.0.1:{port}",))
    child.start()
    backend = MooncakeBackend(max_slices=4)  # several batches per request
    try:
        pool = shuffled_pool(seed=1)
        gen = torch.Generator().manual_seed(0)
        for t in pool_tensors(pool):
            t.copy_(torch.randn(t.shape, generator=gen).to(t.dtype))
        staging = StagingArea(1 << 20, pool.device)
        senders = {mode: KVSender(backend, pool, staging, TransferMode(mode))
                   for mode in ("descriptors", "staging")}

        boot = recv_message(sock)
        assert isinstance(boot, Bootstrap) and boot.role is Role.DECODE
        KVRegistration.of(pool).check_compatible(boot.kv)
        remote = RemoteKV(backend.connect(boot.transfer_peer_info), boot.kv.regions,
                          boot.kv.staging)
        expected = [torch.zeros_like(t) for t in pool_tensors(pool)]
        num_runs = []
        for request_id, seq_len, mode in REQUESTS:
            pre = recv_message(sock)
            assert isinstance(pre, Prealloc) and pre.request_id == request_id
            plan = pre.transfer_plan(WINDOW, PAGE)
            row = pool.allocator.alloc(seq_len)
            src_full = row_pages(row, plan.full)
            src_swa = swa_row_pages(row, plan.swa, pool.allocator.full_to_swa_page)
            sent = senders[mode].send(remote, plan, src_full, src_swa, pre.dst_full_pages,
                                      pre.dst_swa_pages, pre.staging_offset)
            sent.handle.wait(30)
            pool.allocator.free(row)  # the pages' KV stays as it was: nothing writes it again
            assert sent.staged == (mode == "staging")
            num_runs.append(sent.handle.num_slices)
            send_message(sock, KVWritten(request_id, seq_len, 42, staged=sent.staged))
            # what the decode pools must hold: this request's spans, copied slot for slot
            full_t, swa_t = len(pool.full_k) * 2, len(pool.swa_k) * 2
            for span, src_pages, dst_pages, lo, hi in (
                    (plan.full, src_full, pre.dst_full_pages, 0, full_t),
                    (plan.swa, src_swa, pre.dst_swa_pages, full_t, full_t + swa_t)):
                src_ids = torch.as_tensor(span_slot_ids(src_pages, span))
                dst_ids = torch.as_tensor(span_slot_ids(np.array(dst_pages), span))
                for i in range(lo, hi):
                    expected[i][dst_ids] = pool_tensors(pool)[i][src_ids]
        dump = sock.recv_multipart()
        send_message(sock, Abort("*", "bye"))
        child.join(30)
        assert child.exitcode == 0

        assert num_runs[0] > 2 * 2 + 6 * 2  # scattered pages: several runs per tensor
        for got, want in zip(dump, expected):
            assert got == want.view(torch.uint8).numpy().tobytes()
        stats = backend.stats()
        lay = pool.layout
        assert stats.pool_bytes("full") == sum(n for _, n, _ in REQUESTS) * lay.bytes_per_token(False)
        assert stats.pool_bytes("swa") == sum(
            swa_tail_len(n, WINDOW, PAGE) for _, n, _ in REQUESTS) * lay.bytes_per_token(True)
        assert (stats.num_completed, stats.num_failed) == (len(REQUESTS), 0)

        # the peer is gone: the next write fails (at once on loopback), nothing counted
        descs = TransferDescriptors(*(np.array([v], dtype=np.int64) for v in (
            staging.region.addr, remote.staging.addr, 4096, 0)))
        handle = backend.write(remote.peer, descs)
        with pytest.raises(TransferFailed, match="returned -1"):
            handle.wait(60)
        assert isinstance(handle.error, TransferFailed) and handle.done()
        assert backend.stats().num_failed == 1
        assert backend.stats().bytes_by_pool == stats.bytes_by_pool
    finally:
        backend.close()
        sock.close()
        ctx.term()
        if child.is_alive():
            child.kill()
    with pytest.raises(TransferClosed):
        backend.write(remote.peer, descs)


def test_mooncake_refuses_device_tensors_in_the_cpu_only_build(monkeypatch) -> None:
    monkeypatch.setenv("MC_LOG_LEVEL", "ERROR")
    backend = MooncakeBackend()
    try:
        with pytest.raises(TransferError, match="cannot be registered with the CPU-only"):
            backend.register([torch.zeros(4, device="meta")])
        host = torch.zeros(4096, dtype=torch.uint8)
        assert backend.register([host, host]) == backend.session_id  # twice: no-op
        with pytest.raises(TransferError, match="must be 'host:port'"):
            backend.connect("no-port")
        with pytest.raises(TransferFailed, match="did not answer a probe"):
            backend.connect("127.0.0.1:1")  # nothing listens there
    finally:
        backend.close()


# ---- missing package or system library -------------------------------------------------


class _FailingFinder(importlib.abc.MetaPathFinder):
    """Makes `import mooncake.engine` fail the way the dynamic loader does."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def find_spec(self, name, path=None, target=None):
        if name == "mooncake.engine":
            raise self.error
        return None


def test_missing_libibverbs_names_the_debian_package(monkeypatch) -> None:
    monkeypatch.delitem(sys.modules, "mooncake.engine", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_FailingFinder(ImportError(
        "libibverbs.so.1: cannot open shared object file: No such file or directory")),
        *sys.meta_path])
    with pytest.raises(TransferBackendUnavailable) as info:
        MooncakeBackend()
    message = str(info.value)
    assert "libibverbs.so.1" in message and "Debian package libibverbs1" in message
    assert "apt-get install -y libibverbs1" in message
    # an OSError from the loader is reported the same way
    with pytest.raises(TransferBackendUnavailable, match="Debian package libibverbs1"):
        load_mooncake_engine(lambda name: (_ for _ in ()).throw(
            OSError("libibverbs.so.1: cannot open shared object file")))


def test_missing_mooncake_package_names_the_pip_package(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "mooncake.engine", None)  # import now fails
    with pytest.raises(TransferBackendUnavailable,
                       match=r"pip install mooncake-transfer-engine-non-cuda==0\.3\.13\.post1"):
        MooncakeBackend()
    with pytest.raises(TransferBackendUnavailable, match="cannot load mooncake.engine: boom"):
        load_mooncake_engine(lambda name: (_ for _ in ()).throw(ImportError("boom")))


# ---- backend machinery and staging, in process ------------------------------------------


class MemmoveBackend(TransferBackend):
    """Copies within this process; records every batch. `fail_on` fails that batch index."""

    name = "memmove"

    def __init__(self, max_slices: int, fail_on: int | None = None) -> None:
        super().__init__(max_slices)
        self.batch_sizes: list[int] = []
        self.fail_on = fail_on
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()  # set once a batch is inside _write_batch

    def register(self, tensors) -> str:
        return "local"

    def connect(self, peer_info: str) -> str:
        return peer_info

    def _write_batch(self, peer, batch) -> None:
        self.entered.set()
        self.gate.wait()
        if len(self.batch_sizes) == self.fail_on:
            self.batch_sizes.append(-1)
            raise TransferFailed("injected")
        self.batch_sizes.append(len(batch))
        for s, d, n in zip(batch.src_addrs, batch.dst_addrs, batch.lengths):
            ctypes.memmove(d, s, n)

    def _shutdown(self) -> None:
        pass


def test_backend_batches_counts_and_reports_errors() -> None:
    src = torch.arange(64, dtype=torch.uint8)
    dst = torch.zeros(64, dtype=torch.uint8)
    descs = TransferDescriptors(
        np.array([src.data_ptr() + i for i in range(0, 40, 4)], dtype=np.int64),
        np.array([dst.data_ptr() + i for i in range(0, 40, 4)], dtype=np.int64),
        np.full(10, 4, dtype=np.int64), np.array([0] * 6 + [1] * 4, dtype=np.int64))
    with MemmoveBackend(max_slices=3) as backend:
        handle = backend.write("local", descs)
        handle.wait(10)
        assert backend.batch_sizes == [3, 3, 3, 1]
        assert torch.equal(dst[:40], src[:40]) and not dst[40:].any()
        assert handle.latency_s is not None and handle.error is None
        assert backend.stats().bytes_by_pool == (("full", 24), ("swa", 16))
    failing = MemmoveBackend(max_slices=3, fail_on=2)
    handle = failing.write("local", descs)
    with pytest.raises(TransferFailed, match="injected"):
        handle.wait(10)
    assert failing.batch_sizes == [3, 3, -1]  # stops at the failed batch
    stats = failing.stats()
    assert stats.bytes_by_pool == (("full", 24), ("swa", 0)) and stats.num_failed == 1
    failing.close()


def test_close_fails_queued_writes_and_callbacks_run_before_waiters() -> None:
    src, dst = torch.ones(8, dtype=torch.uint8), torch.zeros(8, dtype=torch.uint8)
    one = TransferDescriptors(*(np.array([v], dtype=np.int64)
                                for v in (src.data_ptr(), dst.data_ptr(), 8, 0)))
    backend = MemmoveBackend(max_slices=4)
    backend.gate.clear()  # hold the worker inside the first write
    first, second = backend.write("local", one), backend.write("local", one)
    seen = []
    second.add_done_callback(lambda h: seen.append(type(h.error).__name__))
    assert not first.done() and not second.done()
    worker = backend._workers["local"]
    assert backend.entered.wait(10)  # the first write is running, held at the gate
    closer = threading.Thread(target=backend.close)
    closer.start()
    deadline = time.monotonic() + 10
    while not worker.stopping:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    backend.gate.set()
    closer.join(10)
    first.wait(1)  # the running write finishes
    with pytest.raises(TransferClosed):
        second.wait(1)
    assert seen == ["TransferClosed"]
    with pytest.raises(TransferClosed):
        backend.write("local", one)


def test_disconnect_stops_one_peer_and_a_raising_callback_keeps_the_worker() -> None:
    src, dst = torch.ones(8, dtype=torch.uint8), torch.zeros(8, dtype=torch.uint8)
    one = TransferDescriptors(*(np.array([v], dtype=np.int64)
                                for v in (src.data_ptr(), dst.data_ptr(), 8, 0)))
    backend = MemmoveBackend(max_slices=4)
    backend.gate.clear()
    first, second = backend.write("peer-a", one), backend.write("peer-a", one)
    first.add_done_callback(lambda h: 1 / 0)  # logged, not fatal
    worker = backend._workers["peer-a"]
    assert backend.entered.wait(10)  # the first batch is running, held at the gate
    stopper = threading.Thread(target=backend.disconnect, args=("peer-a",))
    stopper.start()
    deadline = time.monotonic() + 10
    while not worker.stopping:  # the first batch is still held at the gate
        assert time.monotonic() < deadline
        time.sleep(0.001)
    backend.gate.set()
    stopper.join(10)
    first.wait(1)
    with pytest.raises(TransferClosed, match="peer-a closed before the write"):
        second.wait(1)
    again = backend.write("peer-a", one)  # a new worker
    again.wait(10)
    assert backend.batch_sizes == [1, 1] and torch.equal(dst, src)
    backend.close()


def test_staging_area_reserves_aligned_ranges_and_coalesces() -> None:
    area = StagingArea(16 * 4096, "cpu")
    a, b, c = area.reserve(5000), area.reserve(4096), area.reserve(1)
    assert (a, b, c) == (0, 8192, 12288)
    assert area.reserve(13 * 4096) is None
    area.release(b)
    assert area.reserve(8192) == 16384  # first fit: the 4 KiB hole is too small
    area.release(a)
    area.release(c)
    assert area.reserve(4 * 4096) == 0  # holes [0, 8192) + [8192, 12288) + [12288, ..) merged
    with pytest.raises(StagingError):
        area.release(a + 4096)


def test_pack_unpack_round_trip_and_auto_mode(monkeypatch) -> None:
    """Staged bytes land where descriptors would put them; AUTO stages scattered pages
    and sends contiguous ones as descriptors (threshold scaled to this tiny layout:
    scattered runs are 64-128 B, the contiguous request's mean descriptor 452 B)."""
    monkeypatch.setattr(kv_transfer, "STAGING_MAX_MEAN_DESCRIPTOR_BYTES", 256)
    src_pool, dst_pool = shuffled_pool(1), KVPool(layout(), SWAAllocator(FULL_PAGES, SWA_PAGES, PAGE))
    gen = torch.Generator().manual_seed(3)
    for t in pool_tensors(src_pool):
        t.copy_(torch.randn(t.shape, generator=gen).to(t.dtype))
    plan = plan_transfer(0, 37, WINDOW, PAGE)
    row = src_pool.allocator.alloc(37)
    src_full = row_pages(row, plan.full)
    src_swa = swa_row_pages(row, plan.swa, src_pool.allocator.full_to_swa_page)
    dst_full = np.arange(1, plan.full.num_pages + 1)
    dst_swa = np.arange(1, plan.swa.num_pages + 1)
    packed = torch.zeros(sum(staged_nbytes(KVRegions.of(src_pool), plan)), dtype=torch.uint8)
    pack_kv(kv_tensors(src_pool), plan, src_full, src_swa, packed)
    unpack_kv(kv_tensors(dst_pool), plan, dst_full, dst_swa, packed)
    for i, (s, d) in enumerate(zip(pool_tensors(src_pool), pool_tensors(dst_pool))):
        span, sp, dp = ((plan.full, src_full, dst_full) if i < 2 * len(src_pool.full_k)
                        else (plan.swa, src_swa, dst_swa))
        assert torch.equal(d[torch.as_tensor(span_slot_ids(dp, span))],
                           s[torch.as_tensor(span_slot_ids(sp, span))])

    backend = MemmoveBackend(max_slices=1024)
    dst_staging = StagingArea(1 << 16, "cpu")
    receiver = KVReceiver(backend, dst_pool, dst_staging)
    sender = KVSender(backend, src_pool, StagingArea(1 << 16, "cpu"), TransferMode.AUTO)
    remote = RemoteKV("local", KVRegions.of(dst_pool), dst_staging.region)
    offset = receiver.reserve_staging(plan)
    scattered = sender.send(remote, plan, src_full, src_swa, dst_full, dst_swa, offset)
    scattered.handle.wait(10)
    assert scattered.staged
    receiver.complete(plan, dst_full, dst_swa, offset, scattered.staged)
    for i, (s, d) in enumerate(zip(pool_tensors(src_pool), pool_tensors(dst_pool))):
        span, sp, dp = ((plan.full, src_full, dst_full) if i < 2 * len(src_pool.full_k)
                        else (plan.swa, src_swa, dst_swa))
        assert torch.equal(d[torch.as_tensor(span_slot_ids(dp, span))],
                           s[torch.as_tensor(span_slot_ids(sp, span))])
    offset = receiver.reserve_staging(plan)
    contiguous = sender.send(remote, plan, dst_full + 1, dst_swa + 1, dst_full, dst_swa, offset)
    contiguous.handle.wait(10)
    assert not contiguous.staged and contiguous.handle.num_slices == 2 * 1 + 6 * 1
    receiver.complete(plan, dst_full, dst_swa, offset, contiguous.staged)
    assert dst_staging.num_free_bytes == 1 << 16 and sender.staging.num_free_bytes == 1 << 16
    assert backend.stats().num_completed == 2
    backend.close()
