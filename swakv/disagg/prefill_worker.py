"""The prefill worker: computes prompts for decode workers and writes their KV.

Life of a job (one decode worker's request):
```
Bootstrap          a decode worker introduces itself (layout checked, transfer peer
                   connected); answered with this worker's Bootstrap
Prealloc           the plan is checked against the page lists; the prompt becomes an
                   engine request sampling one token (max_tokens 1), marked so that
                   its KV outlives its finish (PrefillScheduler); admission is by the
                   full pool (the SWA pool only holds the window plus the chunk)
prompt done        the request is parked with its KV: full [prefix, L) and the SWA
                   tail are written into the decode worker's pages (KVSender)
write done         KVWritten(first token) to the decode worker; the KV is cached here
                   (committed prefix into the radix tree) or freed
```
Abort from the decode worker: a job still computing is aborted at once; one being
written is answered once the write ended (the decode worker frees its pages only
then). A decode worker declared dead: its computing jobs are aborted, writes still
queued to it fail (`TransferBackend.disconnect`), and every page is freed. HTTP
requests sent straight to a prefill worker are served as by a colocated engine.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, replace

from swakv.disagg.config import PDConfig
from swakv.disagg.control import ControlPlane
from swakv.disagg.descriptors import DescriptorError, LayoutMismatch
from swakv.disagg.kv_transfer import KVSender, RemoteKV, StagingArea, TransferMode
from swakv.disagg.messages import Abort, Bootstrap, KVWritten, MessageError, Prealloc, Role
from swakv.disagg.metrics import PDMetrics, PDStats
from swakv.disagg.pd_sched import PrefillScheduler, install
from swakv.disagg.plan import PlanError, TransferPlan, row_pages, swa_row_pages
from swakv.disagg.transfer import TransferBackend, TransferError, TransferHandle
from swakv.disagg.worker import PDEngineBase
from swakv.engine.core import EngineCore, StepOutput
from swakv.memory.pages import Need
from swakv.sampling_params import SamplingParams
from swakv.sched.request import Request

log = logging.getLogger("swakv.disagg")


@dataclass(frozen=True)
class TransferDone:
    """Posted by a transfer's done callback (a backend thread) for the engine thread."""

    request_id: str  # engine request id of the job


@dataclass(eq=False)
class Job:
    peer: str  # the decode worker (control-plane identity)
    prealloc: Prealloc
    plan: TransferPlan
    handle: TransferHandle | None = None
    staged: bool = False
    first_token_id: int = -1
    abort_requested: bool = False
    peer_lost: bool = False


class PrefillEngine(PDEngineBase):
    role = Role.PREFILL

    def __init__(self, core: EngineCore, control: ControlPlane, backend: TransferBackend,
                 cfg: PDConfig, worker_id: str, staging: StagingArea | None = None,
                 metrics: PDMetrics | None = None) -> None:
        if control.address is None:
            raise ValueError("a prefill worker's control plane must listen")
        super().__init__(core, control, backend, cfg, worker_id, staging, metrics)
        mode = TransferMode.AUTO if staging is not None else TransferMode.DESCRIPTORS
        self.sender = KVSender(backend, core.kv_pool, staging, mode)
        self.scheduler = PrefillScheduler(core.cost, core.cache, core.cfg.max_running_requests)
        install(core, self.scheduler)
        self.decoders: dict[str, RemoteKV] = {}  # decode worker identity -> its KV
        self.jobs: dict[str, Job] = {}  # engine request id -> job
        self.job_ids: dict[tuple[str, str], str] = {}  # (peer, its request id) -> engine id
        self._ids = itertools.count()
        self.num_ok = self.num_failed = 0

    # ---- direct HTTP use: a colocated engine -------------------------------------------
    def add_request(self, prompt_ids: list[int], params: SamplingParams,
                    request_id: str | None = None) -> Request:
        return self.core.add_request(prompt_ids, params, request_id)

    def abort(self, request_id: str) -> bool:
        return self.core.abort(request_id)

    # ---- control messages ----------------------------------------------------------------
    def _on_message(self, peer: str, msg, outputs: list[StepOutput]) -> None:
        if isinstance(msg, Bootstrap):
            self._on_bootstrap(peer, msg)
        elif isinstance(msg, Prealloc):
            self._on_prealloc(peer, msg)
        elif isinstance(msg, Abort):
            self._on_abort(peer, msg)
        else:
            log.warning("prefill worker got an unexpected %s from %s", type(msg).__name__, peer)

    def _on_bootstrap(self, peer: str, msg: Bootstrap) -> None:
        try:
            if msg.role is not Role.DECODE:
                raise LayoutMismatch(f"{msg.worker_id} is a {msg.role} worker")
            self.registration.check_compatible(msg.kv)
            if msg.transfer_backend != self.backend.name:
                raise LayoutMismatch(f"transfer backend {msg.transfer_backend} vs "
                                     f"{self.backend.name}")
            remote = RemoteKV(self.backend.connect(msg.transfer_peer_info), msg.kv.regions,
                              msg.kv.staging)
        except (LayoutMismatch, TransferError) as e:
            log.warning("refusing decode worker %s: %s", peer, e)
            self.control.send(peer, Abort("*", f"refused by {self.worker_id}: {e}"))
            return
        self.decoders[peer] = remote
        self.control.send(peer, self.bootstrap(self.sender.peer_info))

    def _on_prealloc(self, peer: str, msg: Prealloc) -> None:
        rid = msg.request_id
        if peer not in self.decoders:
            self.control.send(peer, Abort(rid, "no Bootstrap from this decode worker"))
            return
        if (peer, rid) in self.job_ids:
            self.control.send(peer, Abort(rid, "duplicate request id"))
            return
        try:
            plan = msg.transfer_plan(self.window, self.page)
            s = msg.sampling
            params = replace(s, max_tokens=1, min_tokens=min(s.min_tokens, 1), logprobs=None)
            erid = f"pd-{next(self._ids)}"
            self.core.add_request(list(msg.prompt_token_ids), params, erid)
        except (MessageError, PlanError, ValueError) as e:  # PromptTooLong, InvalidRequest
            self.control.send(peer, Abort(rid, f"refused: {e}"))
            return
        except Exception as e:  # ours: still answer, so the decode side frees its pages
            log.exception("Prealloc %s from %s failed", rid, peer)
            self.control.send(peer, Abort(rid, f"prefill worker error: {e}"))
            return
        self.scheduler.keep_kv_on_finish.add(erid)
        self.jobs[erid] = Job(peer, msg, plan)
        self.job_ids[(peer, rid)] = erid

    def _on_abort(self, peer: str, msg: Abort) -> None:
        erid = self.job_ids.get((peer, msg.request_id))
        job = self.jobs.get(erid) if erid is not None else None
        if job is None:
            self.control.send(peer, Abort(msg.request_id, "not here"))
            return
        if job.handle is not None:  # being written: answer once the write ended
            job.abort_requested = True
            return
        self.core.abort(erid)
        self._end(erid, job, Abort(msg.request_id, "aborted"))

    def _on_peer_lost(self, peer: str, reason: str, outputs: list[StepOutput]) -> None:
        remote = self.decoders.pop(peer, None)
        if remote is not None:
            self.backend.disconnect(remote.peer)  # queued writes to it fail at once
        for erid, job in list(self.jobs.items()):
            if job.peer != peer:
                continue
            job.peer_lost = True
            if job.handle is None:
                self.core.abort(erid)
                self._end(erid, job, None)

    def _on_local(self, event, outputs: list[StepOutput]) -> None:
        if not isinstance(event, TransferDone):
            super()._on_local(event, outputs)
        job = self.jobs.get(event.request_id)
        if job is None or job.handle is None:
            return
        handle, rid = job.handle, job.prealloc.request_id
        ok = handle.error is None
        self.num_ok += ok
        self.num_failed += not ok
        if handle.latency_s is not None:
            self.pd_metrics.transfer_latency.observe(handle.latency_s)
        if job.peer_lost:
            reply = None
        elif not ok:
            reply = Abort(rid, f"KV write failed: {handle.error}")
        elif job.abort_requested:
            reply = Abort(rid, "aborted")
        else:
            reply = KVWritten(rid, job.plan.seq_len, job.first_token_id, job.staged)
        self._end(event.request_id, job, reply)

    # ---- after each engine step: start the transfers of finished prompts -----------------
    def _after_step(self, outputs: list[StepOutput]) -> list[StepOutput]:
        mine = []
        for out in outputs:
            erid = out.request.request_id
            job = self.jobs.get(erid)
            if job is None:
                mine.append(out)  # a direct HTTP request
            elif out.finished:
                self._prompt_done(erid, job, out)
        return mine

    def _prompt_done(self, erid: str, job: Job, out: StepOutput) -> None:
        req = out.request
        rid = job.prealloc.request_id
        if erid not in self.scheduler.held:  # failed or dropped: its KV is already freed
            self._end(erid, job, Abort(rid, out.error or "prefill failed"))
            return
        remote = self.decoders.get(job.peer)
        if remote is None:
            self._end(erid, job, None)
            return
        kv = req.kv
        try:
            row = self.core.cache.req_table.read(kv.row, 0, job.plan.seq_len)
            src_full = row_pages(row, job.plan.full)
            src_swa = swa_row_pages(row, job.plan.swa, self.core.allocator.full_to_swa_page)
            pre = job.prealloc
            sent = self.sender.send(remote, job.plan, src_full, src_swa, pre.dst_full_pages,
                                    pre.dst_swa_pages, pre.staging_offset)
        except (PlanError, DescriptorError, TransferError) as e:
            log.warning("KV write for %s/%s not started: %s", job.peer, rid, e)
            self.num_failed += 1
            self._end(erid, job, Abort(rid, f"KV write not started: {e}"))
            return
        job.handle, job.staged, job.first_token_id = sent.handle, sent.staged, req.output_ids[0]
        sent.handle.add_done_callback(lambda _h, e=erid: self.events.put(TransferDone(e)))

    def _end(self, erid: str, job: Job, reply) -> None:
        """Free (cache) the job's KV, forget it, answer its decode worker."""
        req = self.core.requests.get(erid)
        if erid in self.scheduler.held:
            self.scheduler.release_held(self.scheduler.held[erid], insert=True)
        self.scheduler.keep_kv_on_finish.discard(erid)
        self.jobs.pop(erid, None)
        self.job_ids.pop((job.peer, job.prealloc.request_id), None)
        if req is not None and not req.is_finished:
            self.core.abort(erid)
        self.core.release(erid)
        if reply is not None and not job.peer_lost:
            self.control.send(job.peer, reply)

    # ---- inspection ------------------------------------------------------------------------
    def _stats(self) -> PDStats:
        sent = dict(self.backend.stats().bytes_by_pool)
        return PDStats(
            role=self.role.value,
            num_peers=len(self.decoders),
            num_inflight=len(self.jobs),
            bytes_sent=Need(sent.get("full", 0), sent.get("swa", 0)),
            num_transfers_ok=self.num_ok,
            num_transfers_failed=self.num_failed,
        )
