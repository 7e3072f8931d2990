"""What both PD worker engines share: the EngineCore facade the AsyncEngine drives,
the control-plane event loop, bootstrap and stats.

A PD worker engine (`PrefillEngine`, `DecodeEngine`) wraps one EngineCore and is
driven by the server's AsyncEngine exactly like an EngineCore (same methods), on the
same single engine thread. Work also arrives from peers, through the control plane's
`events` queue, so `has_unfinished()` is always True and `step()` waits on that
queue for at most IDLE_WAIT_S seconds when the engine has nothing to compute. Control
messages and transfer completions arrive on the queue and end the wait at once; so do
HTTP commands, whose AsyncEngine posts a wake-up (`wake`) with each one.
"""

from __future__ import annotations

import abc
import logging
import os
import queue
import secrets
import socket
from dataclasses import dataclass, replace
from typing import Any

from swakv.disagg.config import PDConfig, check_pd_engine
from swakv.disagg.control import ControlPlane, PeerLost, Received
from swakv.disagg.kv_transfer import StagingArea
from swakv.disagg.messages import Bootstrap, KVRegistration, Role
from swakv.disagg.metrics import PDMetrics, PDStats
from swakv.disagg.transfer import TransferBackend
from swakv.engine.core import EngineCore, StepOutput
from swakv.engine.metrics import EngineSnapshot
from swakv.memory.pages import Need

log = logging.getLogger("swakv.disagg")

# An idle step's longest wait for an event. Everything that brings work ends the wait
# (see the module doc), so this only paces the checks that run between steps (the
# decode role's KV timeouts, `_before_step`).
IDLE_WAIT_S = 0.05
_WAKE = object()  # `wake`'s event: ends a wait, handled by nothing


@dataclass(frozen=True)
class UnavailableOutput(StepOutput):
    """A request failed because a PD peer is gone or timed out: the server answers 503
    (`engine_unavailable`), not 500."""


class UnexpectedEvent(TypeError):
    """An object on a PD engine's event queue that no hook of the engine handles: a
    programming error (the engine thread logs it and goes on)."""


def new_worker_id(role: str) -> str:
    return f"{role}-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def make_staging(cfg: PDConfig, core: EngineCore) -> StagingArea | None:
    if not cfg.pd_staging_memory:
        return None
    return StagingArea(int(cfg.pd_staging_memory), core.kv_pool.device)


class PDEngineBase(abc.ABC):
    """EngineCore facade for AsyncEngine plus the control-plane plumbing; the roles
    implement the abstract hooks below."""

    role: Role

    def __init__(self, core: EngineCore, control: ControlPlane, backend: TransferBackend,
                 cfg: PDConfig, worker_id: str, staging: StagingArea | None = None,
                 metrics: PDMetrics | None = None) -> None:
        check_pd_engine(core.cfg.page_size, core.spec.window)
        self.core, self.control, self.backend, self.cfg = core, control, backend, cfg
        self.worker_id = worker_id
        self.staging = staging
        self.events: queue.SimpleQueue = control.events
        self.window, self.page = core.spec.window, core.cfg.page_size
        self.registration = KVRegistration.of(core.kv_pool,
                                              staging.region if staging is not None else None)
        self.stats = PDStats(role=self.role.value)
        self.pd_metrics = metrics if metrics is not None else PDMetrics(lambda: self.stats)
        self.peak_inflight = 0

    # ---- what AsyncEngine reads ------------------------------------------------------
    @property
    def max_context(self) -> int:
        return self.core.max_context

    @property
    def spec(self):
        return self.core.spec

    @property
    def tokenizer(self):
        return self.core.tokenizer

    @property
    def sampler(self):
        return self.core.sampler

    @property
    def metrics(self):
        return self.core.metrics

    @property
    def requests(self):
        return self.core.requests

    def release(self, request_id: str) -> None:
        self.core.release(request_id)

    def snapshot(self) -> EngineSnapshot:
        return self.core.snapshot()

    def has_unfinished(self) -> bool:
        return True  # peers bring work at any time; step() waits for it when idle

    def check_integrity(self) -> None:
        self.core.check_integrity()

    # ---- stepping ----------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        outputs: list[StepOutput] = []
        self._drain_events(outputs, block=not self._busy())
        self._before_step(outputs)
        if self.core.has_unfinished():
            outputs += self._after_step(self.core.step())
        self._refresh_stats()
        return outputs

    def _drain_events(self, outputs: list[StepOutput], block: bool) -> None:
        try:
            event = self.events.get(timeout=IDLE_WAIT_S) if block else self.events.get_nowait()
        except queue.Empty:
            return
        while True:
            try:
                self._on_event(event, outputs)
            except Exception:  # one bad message must not take the engine thread down
                log.exception("handling PD event %r failed", event)
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                return

    def wake(self) -> None:
        """End an idle step's wait now (any thread): the server has posted a command."""
        self.events.put(_WAKE)

    def _on_event(self, event: Any, outputs: list[StepOutput]) -> None:
        if event is _WAKE:
            return
        if isinstance(event, Received):
            self._on_message(event.peer, event.message, outputs)
        elif isinstance(event, PeerLost):
            log.warning("PD peer %s lost: %s", event.peer, event.reason)
            self._on_peer_lost(event.peer, event.reason, outputs)
        else:
            self._on_local(event, outputs)

    def _busy(self) -> bool:
        return self.core.has_unfinished()

    # ---- role hooks (engine thread) ---------------------------------------------------
    @abc.abstractmethod
    def _on_message(self, peer: str, msg: Any, outputs: list[StepOutput]) -> None:
        """A control message (not a Heartbeat) from `peer`."""

    @abc.abstractmethod
    def _on_peer_lost(self, peer: str, reason: str, outputs: list[StepOutput]) -> None:
        """`peer` is gone (connection closed, silent, or it refused us): settle its requests."""

    def _on_local(self, event: Any, outputs: list[StepOutput]) -> None:
        """An event this process posted to `events` itself (a role that posts any overrides
        this); anything reaching here was posted by mistake."""
        raise UnexpectedEvent(f"{type(self).__name__} has no handler for {event!r}")

    def _before_step(self, outputs: list[StepOutput]) -> None:  # noqa: B027 (optional hook)
        """Work before each engine step (the decode role preallocates here)."""

    def _after_step(self, outputs: list[StepOutput]) -> list[StepOutput]:
        return outputs

    @abc.abstractmethod
    def _stats(self) -> PDStats:
        """The role's PD counters and gauges now (peak_inflight is filled in here)."""

    # ---- shared helpers ----------------------------------------------------------------
    def bootstrap(self, peer_info: str) -> Bootstrap:
        return Bootstrap(self.worker_id, self.role, self.control.address or "",
                         self.backend.name, peer_info, self.registration)

    def fail(self, request_id: str, message: str, unavailable: bool) -> StepOutput | None:
        """Finish a registered request with an error (its KV, if any, freed)."""
        out = self.core.fail(request_id, message)
        if out is None or not unavailable:
            return out
        return UnavailableOutput(out.request, [], "", True, error=message)

    def _refresh_stats(self) -> None:
        stats = self._stats()
        self.peak_inflight = max(self.peak_inflight, stats.num_inflight)
        self.stats = replace(stats, peak_inflight=self.peak_inflight)

    def bytes_per_token(self) -> Need:
        r = self.registration.regions
        return Need(r.bytes_per_token("full"), r.bytes_per_token("swa"))

    def close(self) -> None:
        """Stop the control plane and the transfer backend (after the engine thread)."""
        self.control.close()
        self.backend.close()

