"""The decode worker: preallocates destination pages, receives KV, decodes.

Life of a request (request id = the server's engine request id):
```
add_request        registered in the EngineCore (not scheduled), queued in the
                   Preallocator with its prefill worker (`RoutedPrompt`, set by the
                   router's X-Swakv-Prefill header)
preallocation      both budgets allow and the prefill peer answered its Bootstrap:
                   lock the decode-side prefix hit P, pages for [P, L) (SWA: the tail),
                   `Prealloc` sent; the request is held (DecodeScheduler.held)
KVWritten          (staged: unpack) mark_computed(L); EngineCore.add_decoding(first
                   token): it decodes in the running batch
retraction         DecodeScheduler saves a sparse host copy; the request re-enters the
                   queue at the front and is restored (prefix hit + tail allocation +
                   copy) when the budgets allow; outputs are unchanged
```
Failures: a dead prefill peer (connection closed, or silent for --pd-peer-timeout)
fails its queued and in-flight requests with 503 and frees their pages at once; a
request whose KV has not landed after --pd-kv-timeout fails with 503 and an `Abort`
goes to its prefill worker. A client that goes away, or a timed-out request, keeps
its destination pages until the prefill worker answers (`KVWritten` or `Abort`) or
is declared dead: it may still be writing them. (A prefill worker declared dead that
was only stalled could still finish a write it had started; the control plane cannot
fence the data plane.)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import numpy as np

from swakv.disagg.config import PREFILL_HEADER, PDConfig
from swakv.disagg.control import ControlPlane, is_control_address
from swakv.disagg.descriptors import LayoutMismatch
from swakv.disagg.kv_transfer import KVReceiver, StagingArea
from swakv.disagg.messages import Abort, Bootstrap, KVWritten, Prealloc, Role
from swakv.disagg.metrics import PDMetrics, PDStats
from swakv.disagg.pd_sched import DecodeScheduler, install
from swakv.disagg.plan import TransferPlan, plan_transfer, row_pages, swa_row_pages
from swakv.disagg.prealloc import NeverFits, Pending, Preallocator
from swakv.disagg.transfer import TransferBackend
from swakv.disagg.worker import PDEngineBase, UnavailableOutput
from swakv.engine.core import EngineCore, InvalidRequest, StepOutput
from swakv.engine.metrics import EngineSnapshot
from swakv.memory.kv_pool import KVCopy
from swakv.memory.pages import Need
from swakv.sampling_params import SamplingParams
from swakv.sched.request import Request

log = logging.getLogger("swakv.disagg")


class RoutedPrompt(list):
    """Prompt token ids carrying the control address of the prefill worker to use."""

    def __init__(self, ids, prefill_address: str | None) -> None:
        super().__init__(ids)
        self.prefill_address = prefill_address


@dataclass(eq=False)
class InFlight:
    """A preallocated request whose KV has not landed yet."""

    req: Request
    peer: str
    plan: TransferPlan
    dst_full_pages: np.ndarray
    dst_swa_pages: np.ndarray
    staging_offset: int | None
    sent_at: float
    abandoned: bool = False  # client gone or timed out: free once the peer answers


@dataclass
class _PrefillPeer:
    ready: bool = False


class DecodeEngine(PDEngineBase):
    role = Role.DECODE

    def __init__(self, core: EngineCore, control: ControlPlane, backend: TransferBackend,
                 cfg: PDConfig, worker_id: str, staging: StagingArea | None = None,
                 metrics: PDMetrics | None = None) -> None:
        super().__init__(core, control, backend, cfg, worker_id, staging, metrics)
        self.receiver = KVReceiver(backend, core.kv_pool, staging)
        self.scheduler = DecodeScheduler(core.cost, core.cache, core.cfg.max_running_requests,
                                         core.kv_pool, self._on_retract)
        install(core, self.scheduler)
        self.prealloc = Preallocator(core.cost, core.cache, self.scheduler, core.kv_pool,
                                     tail=cfg.pd_swa_tail_prealloc)
        self.peers: dict[str, _PrefillPeer] = {}
        self.inflight: dict[str, InFlight] = {}
        self.bytes_received = Need()
        self.num_ok = self.num_failed = self.num_restores = 0
        self._next_peer = 0

    # ---- submission (engine thread) ----------------------------------------------------
    def add_request(self, prompt_ids: list[int], params: SamplingParams,
                    request_id: str | None = None) -> Request:
        if params.logprobs is not None:
            raise InvalidRequest("logprobs are not available through PD serving yet",
                                 "logprobs")
        hint = getattr(prompt_ids, "prefill_address", None)
        if hint is not None and not is_control_address(hint):
            raise InvalidRequest(f"{PREFILL_HEADER} must be tcp://HOST:PORT, got {hint!r}",
                                 PREFILL_HEADER)
        peer = hint or self._any_ready_peer()
        req = self.core.register_request(prompt_ids, params, request_id)
        self.prealloc.queue.append(Pending(req, peer=peer))
        if peer is not None:
            self._ensure_peer(peer)
        return req

    def abort(self, request_id: str) -> bool:
        inf = self.inflight.get(request_id)
        if inf is not None:
            self._abandon(inf, "client gone")
            return True
        for item in self.prealloc.queue:
            if item.req.request_id == request_id:
                self.prealloc.queue.remove(item)
                break
        return self.core.abort(request_id)

    def _ready(self, address: str) -> bool:
        peer = self.peers.get(address)
        return peer is not None and peer.ready

    def _any_ready_peer(self) -> str | None:
        ready = [a for a, p in self.peers.items() if p.ready]
        if not ready:
            return None
        self._next_peer += 1
        return ready[self._next_peer % len(ready)]

    def _ensure_peer(self, address: str) -> None:
        if address not in self.peers:
            self.peers[address] = _PrefillPeer()
            self.control.connect(address)
            self.control.send(address, self.bootstrap(self.receiver.peer_info))

    # ---- control messages --------------------------------------------------------------
    def _on_message(self, peer: str, msg, outputs: list[StepOutput]) -> None:
        if isinstance(msg, Bootstrap):
            self._on_bootstrap(peer, msg, outputs)
        elif isinstance(msg, KVWritten):
            self._on_written(peer, msg, outputs)
        elif isinstance(msg, Abort):
            if msg.request_id == "*":
                self._on_peer_lost(peer, f"refused us: {msg.reason}", outputs)
                self.control.forget(peer)
            else:
                self._on_aborted(peer, msg, outputs)
        else:
            log.warning("decode worker got an unexpected %s from %s", type(msg).__name__, peer)

    def _on_bootstrap(self, peer: str, msg: Bootstrap, outputs: list[StepOutput]) -> None:
        state = self.peers.get(peer)
        if state is None:
            return
        try:
            if msg.role is not Role.PREFILL:
                raise LayoutMismatch(f"{peer} is a {msg.role} worker, not a prefill worker")
            self.registration.check_compatible(msg.kv)
        except LayoutMismatch as e:
            self._on_peer_lost(peer, f"incompatible: {e}", outputs)
            self.control.forget(peer)
            return
        state.ready = True

    def _on_written(self, peer: str, msg: KVWritten, outputs: list[StepOutput]) -> None:
        inf = self.inflight.get(msg.request_id)
        if inf is None or inf.peer != peer:
            log.warning("KVWritten for unknown request %s from %s", msg.request_id, peer)
            return
        del self.inflight[msg.request_id]
        req = inf.req
        try:
            if msg.num_tokens != inf.plan.seq_len:
                raise ValueError(f"KV of {msg.num_tokens} tokens, expected {inf.plan.seq_len}")
            self.receiver.complete(inf.plan, inf.dst_full_pages, inf.dst_swa_pages,
                                   inf.staging_offset, msg.staged)
        except Exception as e:  # the peer is done writing: the pages can go
            self._free_inflight(inf, insert=False)
            self._finish_failed(req, f"KV from {peer} unusable: {e}", False, outputs, inf)
            return
        self.prealloc.landed(req)
        self.num_ok += 1
        bpt = self.bytes_per_token()
        self.bytes_received += Need(inf.plan.full.num_tokens * bpt.full,
                                    inf.plan.swa.num_tokens * bpt.swa)
        self.pd_metrics.kv_wait.observe(time.monotonic() - inf.sent_at)
        if inf.abandoned:  # nobody waits for it; its KV is good: cache it
            self.prealloc.drop(req, insert=True)
            self.core.abort(req.request_id)
            self.core.release(req.request_id)
            return
        self.scheduler.held.pop(req.request_id)
        try:
            outputs.append(self.core.add_decoding(req, msg.first_token_id))
        except InvalidRequest as e:
            out = self.fail(req.request_id, f"bad first token from {peer}: {e}", False)
            if out is not None:
                outputs.append(out)

    def _on_aborted(self, peer: str, msg: Abort, outputs: list[StepOutput]) -> None:
        inf = self.inflight.get(msg.request_id)
        if inf is None or inf.peer != peer:
            return  # an answer to an abort we already settled
        del self.inflight[msg.request_id]
        self._free_inflight(inf, insert=False)
        self._finish_failed(inf.req, f"prefill worker {peer} aborted it: {msg.reason}", True,
                            outputs, inf)

    def _on_peer_lost(self, peer: str, reason: str, outputs: list[StepOutput]) -> None:
        self.peers.pop(peer, None)
        message = f"prefill worker {peer} unavailable ({reason})"
        for rid, inf in list(self.inflight.items()):
            if inf.peer == peer:  # a dead peer writes nothing more: free at once
                del self.inflight[rid]
                self._free_inflight(inf, insert=False)
                self._finish_failed(inf.req, message, True, outputs, inf)
        for item in [i for i in self.prealloc.queue if i.peer == peer]:
            self.prealloc.queue.remove(item)
            self._finish_failed(item.req, message, True, outputs, None)

    # ---- preallocation -----------------------------------------------------------------
    def _before_step(self, outputs: list[StepOutput]) -> None:
        self._expire(outputs)
        queue = self.prealloc.queue
        for item in list(queue):
            if item.peer is None and not item.is_restore:
                queue.remove(item)
                self._finish_failed(item.req, "no prefill worker is known: send requests "
                                    "through `swakv router`", True, outputs, None)
                continue
            if not item.is_restore and not self._ready(item.peer):
                continue  # its handshake is under way (or it failed: PeerLost settles it)
            try:
                kv = self.prealloc.try_admit(item)
            except NeverFits as e:
                queue.remove(item)
                self._finish_failed(item.req, str(e), False, outputs, None)
                continue
            if kv is None:
                return  # FIFO: later requests wait behind the first that does not fit
            queue.remove(item)
            if item.is_restore:
                self.prealloc.restore_from_copy(item)
                self.num_restores += 1
            else:
                self._send_prealloc(item)

    def _send_prealloc(self, item: Pending) -> None:
        req = item.req
        kv = req.kv
        seq_len = item.seq_len
        plan = plan_transfer(kv.kv_len, seq_len, self.window, self.page)
        row = self.core.cache.req_table.read(kv.row, 0, seq_len)
        full = row_pages(row, plan.full)
        swa = swa_row_pages(row, plan.swa, self.core.allocator.full_to_swa_page)
        offset = self.receiver.reserve_staging(plan)
        self.inflight[req.request_id] = InFlight(req, item.peer, plan, full, swa, offset,
                                                 time.monotonic())
        self.control.send(item.peer, Prealloc(
            req.request_id, self.worker_id, tuple(req.prompt_ids), plan.prefix_len,
            tuple(full.tolist()), tuple(swa.tolist()), offset, req.params))

    def _expire(self, outputs: list[StepOutput]) -> None:
        # `inflight` is in send order, so in `sent_at` order (monotonic clock): stop at
        # the first request still within its timeout. Nothing here removes entries.
        deadline = time.monotonic() - self.cfg.pd_kv_timeout
        for inf in self.inflight.values():
            if inf.sent_at >= deadline:
                return
            if not inf.abandoned:
                message = (f"no KV from prefill worker {inf.peer} after "
                           f"{self.cfg.pd_kv_timeout:g} s")
                self._abandon(inf, message)
                out = self.fail_held(inf.req, message, unavailable=True)
                if out is not None:
                    outputs.append(out)

    def _abandon(self, inf: InFlight, reason: str) -> None:
        """Stop waiting for a request's KV; its pages stay until the peer answers."""
        if not inf.abandoned:
            inf.abandoned = True
            self.control.send(inf.peer, Abort(inf.req.request_id, reason))

    def fail_held(self, req: Request, message: str, unavailable: bool) -> StepOutput | None:
        """Answer a held request's client with an error while its KV stays held: the
        request stays registered (unfinished) until its pages are freed."""
        req.error = message
        cls = UnavailableOutput if unavailable else StepOutput
        return cls(req, [], "", True, error=message)

    def _free_inflight(self, inf: InFlight, insert: bool) -> None:
        self.receiver.complete(inf.plan, inf.dst_full_pages, inf.dst_swa_pages,
                               inf.staging_offset, staged=False)
        self.prealloc.drop(inf.req, insert=insert)

    def _finish_failed(self, req: Request, message: str, unavailable: bool,
                       outputs: list[StepOutput], inf: InFlight | None) -> None:
        if inf is not None:
            self.num_failed += 1
        if inf is not None and inf.abandoned:  # the client already had its answer
            self.core.abort(req.request_id)
            self.core.release(req.request_id)
            return
        out = self.fail(req.request_id, message, unavailable)
        if out is not None:
            outputs.append(out)

    # ---- retraction ----------------------------------------------------------------------
    def _on_retract(self, req: Request, copy: KVCopy) -> None:
        self.prealloc.queue.appendleft(Pending(req, copy=copy))

    # ---- inspection ----------------------------------------------------------------------
    def snapshot(self) -> EngineSnapshot:
        snap = self.core.snapshot()
        return replace(snap, num_waiting=snap.num_waiting + len(self.prealloc.queue))

    def _stats(self) -> PDStats:
        return PDStats(
            role=self.role.value,
            num_peers=sum(p.ready for p in self.peers.values()),
            num_queued=len(self.prealloc.queue),
            num_inflight=len(self.inflight),
            budget=self.prealloc.budget(),
            bytes_received=self.bytes_received,
            num_transfers_ok=self.num_ok,
            num_transfers_failed=self.num_failed,
            num_host_copies=self.scheduler.num_host_copies,
            num_restores=self.num_restores,
        )
