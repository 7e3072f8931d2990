"""AsyncEngine: the EngineCore stepped by ONE background thread, fed from asyncio.

Threading contract:
- Only the engine thread touches the EngineCore after `start()`. HTTP handlers talk
  to it through `_cmds` (a thread-safe queue) that the thread drains before every
  step; when the engine has no work the thread blocks on that queue (no spinning).
- Results go back to the event loop with `loop.call_soon_threadsafe`, batched: one
  call per loop iteration puts every event of that iteration on its request
  group's `asyncio.Queue`.
- `snapshot` (pool usage, queue lengths, counters) is rebuilt by the engine thread
  and replaced atomically; /metrics and /health read it without touching the engine.
  It is rebuilt after every batch of commands, after every step in which a request
  got its first token, finished or failed, before the thread idles, and otherwise at
  least every SNAPSHOT_MAX_AGE_S while steps run: a plain decode step does not pay
  for it (~36 us of a ~19 ms batch-4 decode step on the default model, 2 CPU cores).
  It is always rebuilt before the events of the same iteration are flushed, so a
  client that saw an event and then scrapes /metrics sees that event's state.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from swakv.engine.metrics import EngineSnapshot as Snapshot
from swakv.sampling_params import SamplingParams

log = logging.getLogger("swakv.server")

SNAPSHOT_MAX_AGE_S = 0.1  # while busy, /metrics lags the engine by at most this


@dataclass(frozen=True)
class Accepted:
    index: int
    request_id: str


@dataclass(frozen=True)
class Failed:
    index: int
    error: BaseException


@dataclass(frozen=True)
class Delta:
    """New output of one choice; `finish_reason` and the token counts are set on the last."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


class EngineUnavailable(RuntimeError):
    """The engine thread has stopped (shutdown) or died (a step raised)."""


class Observer:
    """Timing hooks the engine thread calls (the Prometheus histograms implement them)."""

    def on_step(self, seconds: float) -> None: ...
    def on_first_token(self, seconds: float) -> None: ...
    def on_finish(self, seconds: float) -> None: ...


@dataclass
class _Sink:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    index: int


_STOP = object()


class RequestGroup:
    """The n choices (x prompts) of one HTTP request; events arrive on one queue."""

    def __init__(self, engine: AsyncEngine, q: asyncio.Queue, request_ids: list[str]) -> None:
        self.engine, self.queue, self.request_ids = engine, q, request_ids
        self.finished: set[int] = set()
        self.closed = False

    async def wait_accepted(self) -> None:
        """Wait until the engine queued every choice; on any failure abort all and raise it."""
        error: BaseException | None = None
        for _ in self.request_ids:
            ev = await self.queue.get()
            if isinstance(ev, Failed):
                self.finished.add(ev.index)
                error = error or ev.error
        if error is not None:
            self.close()
            raise error

    async def events(self) -> AsyncIterator[Delta]:
        """Deltas until every choice finished; raises EngineUnavailable if the engine stops."""
        while len(self.finished) < len(self.request_ids):
            ev = await self.queue.get()
            if isinstance(ev, Failed):
                self.finished.add(ev.index)
                self.close()
                raise ev.error
            if ev.finish_reason is not None:
                self.finished.add(ev.index)
            yield ev

    def close(self) -> None:
        """Abort every choice that has not finished (idempotent; safe from any thread)."""
        if self.closed:
            return
        self.closed = True
        pending = [rid for i, rid in enumerate(self.request_ids) if i not in self.finished]
        if pending:
            self.engine.abort(pending)


class RequestFailed(RuntimeError):
    """The engine failed one request (its step raised, or it could never be scheduled);
    the server answers it with a 500 `server_error`. Other requests are unaffected."""


class AsyncEngine:
    def __init__(self, engine: Any, observer: Observer | None = None) -> None:
        self.engine = engine  # owned by the engine thread once started
        self.observer = observer or Observer()
        # Immutable facts the HTTP side may read directly.
        self.max_context: int = engine.max_context
        self.vocab_size: int = engine.spec.vocab_size
        self.tokenizer = engine.tokenizer
        self.supports_logprobs = bool(getattr(engine.sampler, "supports_logprobs", True))
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        # `_closed` is set (under `_submit_lock`) before _STOP is queued, and `submit`
        # queues only while it is clear: no command can follow _STOP unanswered.
        self._submit_lock = threading.Lock()
        self._closed = False
        self._live: dict[str, _Sink] = {}  # engine thread only
        self._outbox: list[tuple[_Sink, Any]] = []  # engine thread only
        self._thread = threading.Thread(target=self._main, name="swakv-engine", daemon=True)
        self.error: BaseException | None = None
        self.stopped = False
        self.snapshot: Snapshot = engine.snapshot()
        self._snapshot_time = time.monotonic()  # engine thread only after start()

    # ---- event-loop side ----------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Abort whatever still runs and join the thread."""
        with self._submit_lock:
            if not self._closed:
                self._closed = True
                self._post(_STOP)
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.stopped = True

    @property
    def healthy(self) -> bool:
        return self.error is None and self._thread.is_alive() and not self.stopped

    def submit(self, request_id: str, work: list[tuple[list[int], SamplingParams]]
               ) -> RequestGroup:
        """Queue one engine request per (prompt_ids, params); call from the event loop.

        Every queued command is answered (Accepted or Failed), even if the engine fails
        or stops right after: the thread answers whatever it reads, up to _STOP.
        """
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        ids = [f"{request_id}-{i}" for i in range(len(work))]
        items = [(rid, p, sp, _Sink(loop, q, i)) for i, (rid, (p, sp)) in enumerate(zip(ids, work))]
        with self._submit_lock:
            if self._closed or not self.healthy:
                raise EngineUnavailable(f"engine is not running: {self.error or 'shut down'}")
            self._post(("add", items))
        return RequestGroup(self, q, ids)

    def abort(self, request_ids: list[str]) -> None:
        self._post(("abort", list(request_ids)))

    def _post(self, cmd: Any) -> None:
        self._cmds.put(cmd)
        self._wake_engine()

    def _wake_engine(self) -> None:
        """After a command is posted (any thread). The engine thread waits on the command
        queue itself when idle; an engine whose idle step waits elsewhere (PD workers)
        overrides this to end that wait."""

    # ---- engine thread ------------------------------------------------------------
    def _main(self) -> None:
        """The thread body: `_run`, and if anything escapes it, fail every waiter."""
        try:
            self._run()
        except BaseException as e:  # a bug outside the contained step: nobody may hang
            log.exception("engine thread died; failing all requests")
            self.error = self.error or e
            self._fail_all(EngineUnavailable(f"engine failed: {e}"))
            with self._submit_lock:
                self._closed = True
            for cmd in self._drain(block=False):
                self._answer_unavailable(cmd, "engine failed")
            self._flush()

    def _run(self) -> None:
        while True:
            busy = self.error is None and self.engine.has_unfinished()
            cmds = self._drain(block=not busy)
            if _STOP in cmds:
                before = cmds[: cmds.index(_STOP)]
                for cmd in before:
                    self._answer_unavailable(cmd, "server is shutting down")
                self._shutdown()
                return
            for cmd in cmds:
                self._handle(cmd)
            if cmds:  # show new and aborted requests before a possibly long step
                self._refresh_snapshot()
                self._flush()
            changed = True  # no step: the loop is about to idle (or the engine failed)
            if self.error is None and self.engine.has_unfinished():
                changed = self._step() or not self.engine.has_unfinished()
            if changed or time.monotonic() - self._snapshot_time >= SNAPSHOT_MAX_AGE_S:
                self._refresh_snapshot()
            self._flush()

    def _refresh_snapshot(self) -> None:
        self._snapshot_time = time.monotonic()
        try:
            self.snapshot = self.engine.snapshot()
        except Exception:  # metrics must never take the engine down: keep the last one
            log.exception("engine snapshot failed; /metrics shows the previous one")

    def _drain(self, block: bool) -> list:
        cmds = []
        try:
            cmds.append(self._cmds.get(block=block))
            while True:
                cmds.append(self._cmds.get_nowait())
        except queue.Empty:
            pass
        return cmds

    def _answer_unavailable(self, cmd, why: str) -> None:
        """Answer an unhandled command: every add gets Failed, aborts need nothing."""
        if cmd is _STOP or cmd[0] != "add":
            return
        for _rid, _p, _sp, sink in cmd[1]:
            self._emit(sink, Failed(sink.index, EngineUnavailable(why)))

    def _handle(self, cmd) -> None:
        kind, payload = cmd
        if kind == "add":
            for rid, prompt_ids, params, sink in payload:
                self._add(rid, prompt_ids, params, sink)
        elif kind == "abort":
            for rid in payload:
                if self._live.pop(rid, None) is not None:
                    try:
                        self.engine.abort(rid)
                        self.engine.release(rid)
                    except Exception:
                        log.exception("abort of %s failed", rid)

    def _add(self, rid: str, prompt_ids: list[int], params: SamplingParams, sink: _Sink) -> None:
        if self.error is not None:
            self._emit(sink, Failed(sink.index, EngineUnavailable(str(self.error))))
            return
        try:
            self.engine.add_request(prompt_ids, params, request_id=rid)
        except ValueError as e:  # PromptTooLong, InvalidRequest: the client's fault (400)
            self._emit(sink, Failed(sink.index, e))
            return
        except Exception as e:  # anything else is ours (500), and the engine goes on
            log.exception("adding request %s failed", rid)
            self._emit(sink, Failed(sink.index, RequestFailed(f"internal error: {e}")))
            return
        self._live[rid] = sink
        self._emit(sink, Accepted(sink.index, rid))

    def _fail_all(self, error: BaseException) -> None:
        for sink in self._live.values():
            self._emit(sink, Failed(sink.index, error))
        self._live.clear()

    def _step(self) -> bool:
        """One engine step; True if a request got its first token, finished or failed
        (states /metrics must show before their events reach clients)."""
        eng = self.engine
        t0 = time.perf_counter()
        steps_before = eng.metrics.num_steps
        try:
            outputs = eng.step()
        except Exception as e:  # corruption (or an uncontained bug): stop, answer all 503
            log.exception("engine step failed beyond containment; failing all requests")
            self.error = e
            self._fail_all(EngineUnavailable(f"engine failed: {e}"))
            return True
        if eng.metrics.num_steps > steps_before:
            self.observer.on_step(time.perf_counter() - t0)
        changed = False
        for out in outputs:
            changed |= self._deliver_output(out)
        return changed

    def _failure(self, out) -> Exception:
        """What a failed output (`out.error` set) raises in its client's handler."""
        return RequestFailed(out.error)

    def _deliver_output(self, out) -> bool:
        """Emit one output's event; True if its request got its first token, finished
        or failed."""
        req = out.request
        sink = self._live.get(req.request_id)
        if sink is None:
            return False
        if out.error is not None:
            del self._live[req.request_id]
            self.engine.release(req.request_id)
            self._emit(sink, Failed(sink.index, self._failure(out)))
            return True
        n_new = len(out.new_token_ids)
        logprobs = list(out.logprobs) if out.logprobs is not None else None
        first = req.num_output_tokens == n_new and n_new > 0
        if first and req.first_token_time is not None:
            self.observer.on_first_token(req.first_token_time - req.arrival_time)
        if not out.finished:
            self._emit(sink, Delta(sink.index, out.delta_text, out.new_token_ids, logprobs))
            return first
        reason = req.finish_reason.value if req.finish_reason else "stop"
        self._emit(sink, Delta(sink.index, out.delta_text, out.new_token_ids, logprobs,
                               reason, req.num_prompt_tokens, req.num_output_tokens,
                               req.cached_prompt_tokens))
        if req.finish_time is not None:
            self.observer.on_finish(req.finish_time - req.arrival_time)
        del self._live[req.request_id]
        self.engine.release(req.request_id)
        return True

    def _shutdown(self) -> None:
        for rid, sink in list(self._live.items()):
            try:
                self.engine.abort(rid)
                self.engine.release(rid)
            except Exception:
                log.exception("abort of %s at shutdown failed", rid)
            self._emit(sink, Failed(sink.index, EngineUnavailable("server is shutting down")))
        self._live.clear()
        self._refresh_snapshot()
        self._flush()

    def _emit(self, sink: _Sink, event: Any) -> None:
        self._outbox.append((sink, event))

    def _flush(self) -> None:
        if not self._outbox:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Sink, Any]]] = {}
        for sink, event in self._outbox:
            by_loop.setdefault(sink.loop, []).append((sink, event))
        self._outbox = []
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                pass


def _deliver(batch: list[tuple[_Sink, Any]]) -> None:
    for sink, event in batch:
        sink.queue.put_nowait(event)
