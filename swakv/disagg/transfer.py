"""Transfer backends: the PD data plane.

A `TransferBackend` registers memory, connects to peers by the opaque info string
their `register` returned, and writes batches of (src, dst, length) descriptors
into the peer's registered memory. Writes to one peer run in order on one worker
thread, one batch (<= max_slices descriptors) outstanding at a time, so the
per-peer queue of the engine (Mooncake TCP: 1,024 slices) never overflows however
many requests are in flight. Each `write` returns a `TransferHandle`
(done / wait / error / latency); the backend counts the bytes of completed
batches per pool.

`MooncakeBackend` is the default: Mooncake Transfer Engine, TCP with a P2P
handshake (no metadata server); the same calls take protocol "rdma" on clusters.
A NIXL backend would map register -> register_memory + agent metadata (the peer
info), connect -> add_remote_agent, _write_batch -> initialize_xfer("WRITE") +
transfer + polling check_xfer_state. What moves for a request and whether it is
staged is decided above this layer (swakv/disagg/kv_transfer.py).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from swakv.disagg.descriptors import (
    DEFAULT_MAX_SLICES,
    POOLS,
    DescriptorBatch,
    TensorRegion,
    TransferDescriptors,
)

log = logging.getLogger(__name__)

MOONCAKE_PIP = "mooncake-transfer-engine-non-cuda==0.3.13.post1"
LIBIBVERBS = "libibverbs.so.1"
LIBIBVERBS_DEBIAN_PACKAGE = "libibverbs1"


class TransferError(Exception):
    """Base of the data plane's errors."""


class TransferBackendUnavailable(TransferError):
    """The backend's package or a system library it needs cannot be loaded."""


class TransferFailed(TransferError):
    """A write did not complete (peer dead or unreachable, address not registered there)."""


class TransferTimeout(TransferError):
    """wait() ran out of time; the transfer goes on."""


class TransferClosed(TransferError):
    """The backend was closed before the write ran."""


def load_mooncake_engine(import_module: Callable = importlib.import_module) -> type:
    """`mooncake.engine.TransferEngine`, or TransferBackendUnavailable saying what to install."""
    try:
        return import_module("mooncake.engine").TransferEngine
    except ModuleNotFoundError as e:
        if e.name not in ("mooncake", "mooncake.engine"):
            raise TransferBackendUnavailable(f"cannot load mooncake.engine: {e}") from e
        raise TransferBackendUnavailable(
            f"the Mooncake transfer engine is not installed: pip install {MOONCAKE_PIP} "
            "(CPU hosts; mooncake-transfer-engine on CUDA hosts)") from e
    except (ImportError, OSError) as e:
        if LIBIBVERBS in str(e):
            raise TransferBackendUnavailable(
                f"mooncake.engine needs the system library {LIBIBVERBS} even for TCP: install "
                f"the Debian package {LIBIBVERBS_DEBIAN_PACKAGE} (apt-get update && apt-get "
                f"install -y {LIBIBVERBS_DEBIAN_PACKAGE}); the loader said: {e}") from e
        raise TransferBackendUnavailable(f"cannot load mooncake.engine: {e}") from e


class TransferHandle:
    """One write to one peer: completes once, successfully or with `error`."""

    def __init__(self, peer: str, bytes_by_pool: dict[str, int], num_slices: int) -> None:
        self.peer = peer
        self.bytes_by_pool = bytes_by_pool
        self.num_slices = num_slices
        self.submitted_at = time.perf_counter()
        self.finished_at: float | None = None
        self._error: TransferError | None = None
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[TransferHandle], None]] = []

    def done(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> None:
        """Block until done; raise its error if it failed, TransferTimeout if still running."""
        if not self._event.wait(timeout):
            raise TransferTimeout(f"transfer to {self.peer} not done after {timeout} s")
        if self._error is not None:
            raise self._error

    @property
    def error(self) -> TransferError | None:
        return self._error

    @property
    def latency_s(self) -> float | None:
        """Seconds from write() to completion; None while running."""
        return None if self.finished_at is None else self.finished_at - self.submitted_at

    def add_done_callback(self, fn: Callable[[TransferHandle], None]) -> None:
        """Call fn(handle) once done (now, if it already is); runs before waiters wake."""
        with self._lock:
            if self.finished_at is None:
                self._callbacks.append(fn)
                return
        fn(self)

    def _finish(self, error: TransferError | None, finished_at: float) -> None:
        with self._lock:
            self._error = error
            self.finished_at = finished_at
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            try:
                fn(self)
            except Exception:  # a cleanup bug must not kill the peer's worker thread
                log.exception("done callback of a transfer to %s raised", self.peer)
        self._event.set()


@dataclass(frozen=True)
class TransferStats:
    """Counters of one backend since it started; bytes count completed batches only."""

    bytes_by_pool: tuple[tuple[str, int], ...]
    num_completed: int
    num_failed: int
    latency_total_s: float
    latency_max_s: float

    def pool_bytes(self, pool: str) -> int:
        return dict(self.bytes_by_pool)[pool]


class TransferBackend(ABC):
    """Registers memory and writes descriptor batches into peers' registered memory."""

    name: str = ""

    def __init__(self, max_slices: int = DEFAULT_MAX_SLICES) -> None:
        if max_slices < 1:
            raise ValueError(f"max_slices must be >= 1, got {max_slices}")
        self.max_slices = max_slices
        self._lock = threading.Lock()
        self._workers: dict[str, _PeerWorker] = {}
        self._closed = False
        self._bytes = dict.fromkeys(POOLS, 0)
        self._num_completed = self._num_failed = 0
        self._latency_total = self._latency_max = 0.0

    @abstractmethod
    def register(self, tensors: Sequence[torch.Tensor]) -> str:
        """Register contiguous tensors for transfers; returns the info peers connect with."""

    @abstractmethod
    def connect(self, peer_info: str) -> str:
        """Make a peer known (its register() result); returns the name write() takes."""

    @abstractmethod
    def _write_batch(self, peer: str, batch: DescriptorBatch) -> None:
        """Write one batch synchronously; raise TransferFailed if it did not complete."""

    @abstractmethod
    def _shutdown(self) -> None:
        """Release the engine's resources (after every worker stopped)."""

    def write(self, peer: str, descriptors: TransferDescriptors) -> TransferHandle:
        """Queue a write of `descriptors` to `peer`; batches run in order on its worker."""
        batches = descriptors.batches(self.max_slices)
        handle = TransferHandle(peer, descriptors.bytes_by_pool(), len(descriptors))
        with self._lock:
            if self._closed:
                raise TransferClosed(f"{self.name} backend is closed")
            worker = self._workers.get(peer)
            if worker is None:
                worker = self._workers[peer] = _PeerWorker(self, peer)
            worker.submit(handle, batches)
        return handle

    def disconnect(self, peer: str) -> None:
        """Stop the peer's worker (a gone peer): queued writes fail with TransferClosed,
        a running batch is waited for. A later write to it starts a new worker."""
        with self._lock:
            worker = self._workers.pop(peer, None)
        if worker is not None:
            worker.stop()

    def stats(self) -> TransferStats:
        with self._lock:
            return TransferStats(tuple(self._bytes.items()), self._num_completed,
                                 self._num_failed, self._latency_total, self._latency_max)

    def close(self) -> None:
        """Fail queued writes with TransferClosed, wait for running batches, release."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            workers = list(self._workers.values())
        for w in workers:
            w.stop()
        self._shutdown()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> TransferBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _count_batch(self, batch: DescriptorBatch) -> None:
        with self._lock:
            for pool, nbytes in batch.bytes_by_pool:
                self._bytes[pool] += nbytes

    def _count_finished(self, latency: float, ok: bool) -> None:
        with self._lock:
            self._num_completed += ok
            self._num_failed += not ok
            self._latency_total += latency
            self._latency_max = max(self._latency_max, latency)


class _PeerWorker:
    """Runs one peer's writes in submission order on its own thread."""

    def __init__(self, backend: TransferBackend, peer: str) -> None:
        self.backend = backend
        self.peer = peer
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name=f"swakv-transfer-{peer}", daemon=True)
        self.thread.start()

    def submit(self, handle: TransferHandle, batches: tuple[DescriptorBatch, ...]) -> None:
        self.queue.put((handle, batches))

    def stop(self) -> None:
        self.stopping = True
        self.queue.put(None)
        self.thread.join()

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            handle, batches = item
            error = self._write_all(batches)
            finished_at = time.perf_counter()
            self.backend._count_finished(finished_at - handle.submitted_at, error is None)
            handle._finish(error, finished_at)

    def _write_all(self, batches: tuple[DescriptorBatch, ...]) -> TransferError | None:
        """Write batches in order; stop at the first failure (earlier ones stay written)."""
        for batch in batches:
            if self.stopping:
                return TransferClosed(f"{self.backend.name}: {self.peer} closed before the write")
            try:
                self.backend._write_batch(self.peer, batch)
            except TransferError as e:
                return e
            except Exception as e:  # an engine binding raising is a failed write too
                return TransferFailed(f"write to {self.peer} raised {e!r}")
            self.backend._count_batch(batch)
        return None


def _host_only_mooncake() -> bool:
    try:
        importlib.metadata.version("mooncake-transfer-engine-non-cuda")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


class MooncakeBackend(TransferBackend):
    """Mooncake Transfer Engine with a P2P handshake (no metadata server).

    Peer info is the engine's session id "host:rpc_port". Mooncake opens the peer's
    segment on the first write and fails writes to a dead peer at once on loopback
    (connection refused / reset); a silent host costs MC_TRANSFER_TIMEOUT (30 s).
    Measured on 0.3.13.post1: the engine listens on a random RPC port and a random
    TCP data port on all interfaces whatever `hostname` says, and takes writes into
    registered memory from anyone who reaches them (it refuses addresses outside
    registered buffers): firewall them. batch_transfer_sync_write busy-polls, so a
    peer's worker thread holds a CPU core while a batch is in flight. Destroying the
    engine takes ~1 s. Set MC_LOG_LEVEL=ERROR to silence its per-engine INFO log.
    """

    name = "mooncake"

    def __init__(
        self,
        hostname: str = "127.0.0.1",
        protocol: str = "tcp",
        device_name: str = "",
        max_slices: int = DEFAULT_MAX_SLICES,
        engine_cls: type | None = None,
    ) -> None:
        super().__init__(max_slices)
        engine = (engine_cls or load_mooncake_engine())()
        rc = engine.initialize(hostname, "P2PHANDSHAKE", protocol, device_name)
        if rc != 0:
            raise TransferError(f"Mooncake initialize({hostname!r}, {protocol!r}) returned {rc}")
        self._engine = engine
        self.session_id = f"{hostname}:{engine.get_rpc_port()}"
        self._registered: dict[int, torch.Tensor] = {}  # addr -> tensor kept alive

    def register(self, tensors: Sequence[torch.Tensor]) -> str:
        for t in tensors:
            if t.device.type != "cpu" and _host_only_mooncake():
                raise TransferError(
                    f"a {t.device} tensor cannot be registered with the CPU-only Mooncake "
                    "build (mooncake-transfer-engine-non-cuda): install mooncake-transfer-engine")
            region = TensorRegion.of(t)  # contiguous, so [addr, addr + nbytes) is the tensor
            if region.addr in self._registered:
                continue
            rc = self._engine.register_memory(region.addr, t.numel() * t.element_size())
            if rc != 0:
                raise TransferError(f"Mooncake register_memory({region.addr:#x}) returned {rc}")
            self._registered[region.addr] = t
        return self.session_id

    def connect(self, peer_info: str) -> str:
        host, sep, port = peer_info.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise TransferError(f"Mooncake peer info must be 'host:port', got {peer_info!r}")
        rc = self._engine.send_probe(peer_info)
        if rc != 0:
            raise TransferFailed(f"Mooncake peer {peer_info} did not answer a probe (rc {rc})")
        return peer_info

    def _write_batch(self, peer: str, batch: DescriptorBatch) -> None:
        rc = self._engine.batch_transfer_sync_write(
            peer, list(batch.src_addrs), list(batch.dst_addrs), list(batch.lengths))
        if rc != 0:
            raise TransferFailed(
                f"Mooncake write of {len(batch)} slices ({batch.nbytes} bytes) to {peer} "
                f"returned {rc}: peer dead or unreachable, or an address outside its "
                "registered memory (the engine's log says which)")

    def _shutdown(self) -> None:
        for addr in self._registered:
            self._engine.unregister_memory(addr)
        self._registered.clear()
        self._engine = None  # its destructor closes sockets and threads (~1 s)
