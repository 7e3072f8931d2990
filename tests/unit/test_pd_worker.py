"""The PD engine base's contract without an engine behind it: the role hooks are
abstract, both roles implement them, and an event no hook handles is a typed error
that the event loop logs without stopping the events after it."""

from __future__ import annotations

import logging
import queue
import threading
import time

import pytest

from swakv.disagg import worker
from swakv.disagg.control import PeerLost, Received
from swakv.disagg.decode_worker import DecodeEngine
from swakv.disagg.messages import Abort
from swakv.disagg.metrics import PDStats
from swakv.disagg.prefill_worker import PrefillEngine
from swakv.disagg.worker import PDEngineBase, UnexpectedEvent
from swakv.server.pd_app import PDAsyncEngine

HOOKS = frozenset({"_on_message", "_on_peer_lost", "_stats"})


class Recorder(PDEngineBase):
    """The hooks only, recording what reaches them (no engine, control plane or backend)."""

    def _on_message(self, peer, msg, outputs) -> None:
        self.seen.append(("message", peer, msg))

    def _on_peer_lost(self, peer, reason, outputs) -> None:
        self.seen.append(("lost", peer, reason))

    def _stats(self) -> PDStats:
        return PDStats(role="test")


def recorder() -> Recorder:
    rec = Recorder.__new__(Recorder)  # skip __init__: it needs a built EngineCore
    rec.seen, rec.events = [], queue.SimpleQueue()
    return rec


def test_role_hooks_are_abstract_and_both_roles_implement_them():
    assert PDEngineBase.__abstractmethods__ == HOOKS
    assert PrefillEngine.__abstractmethods__ == frozenset()
    assert DecodeEngine.__abstractmethods__ == frozenset()
    with pytest.raises(TypeError, match="abstract"):
        PDEngineBase(None, None, None, None, "w")

    class NoStats(PDEngineBase):
        def _on_message(self, peer, msg, outputs) -> None: ...
        def _on_peer_lost(self, peer, reason, outputs) -> None: ...

    with pytest.raises(TypeError, match="_stats"):
        NoStats(None, None, None, None, "w")


def test_an_unhandled_event_is_a_typed_error():
    with pytest.raises(UnexpectedEvent, match="Recorder has no handler for 'stray'"):
        recorder()._on_event("stray", [])
    prefill = PrefillEngine.__new__(PrefillEngine)
    with pytest.raises(UnexpectedEvent, match="PrefillEngine has no handler"):
        prefill._on_local(42, [])  # only TransferDone is its own event
    assert issubclass(UnexpectedEvent, TypeError)


def test_a_bad_event_is_logged_and_the_events_after_it_are_handled(caplog):
    rec = recorder()
    for event in (Received("p", Abort("r1", "x")), "stray", PeerLost("p", "gone")):
        rec.events.put(event)
    with caplog.at_level(logging.ERROR, logger="swakv.disagg"):
        rec._drain_events([], block=False)
    assert rec.seen == [("message", "p", Abort("r1", "x")), ("lost", "p", "gone")]
    assert rec.events.empty()
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "handling PD event 'stray' failed" in record.getMessage()
    assert record.exc_info[0] is UnexpectedEvent


def test_wake_ends_an_idle_wait_and_reaches_no_hook(monkeypatch, caplog):
    """An idle step waits on the event queue; `wake` (posted by the server with each
    HTTP command) ends the wait at once and is no event for the role hooks."""
    monkeypatch.setattr(worker, "IDLE_WAIT_S", 30.0)  # a missed wake would hang the test
    rec = recorder()
    waker = threading.Timer(0.1, rec.wake)
    waker.start()
    outputs: list = []
    t0 = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="swakv.disagg"):
        rec._drain_events(outputs, block=True)
        rec.wake()
        rec.events.put(PeerLost("p", "gone"))  # what follows a wake is still handled
        rec._drain_events(outputs, block=True)
    assert time.monotonic() - t0 < 10.0
    waker.join()
    assert rec.seen == [("lost", "p", "gone")] and outputs == []
    assert rec.events.empty() and not caplog.records


def test_pd_server_wakes_its_engine_with_every_command():
    """PDAsyncEngine posts a wake-up to the PD engine after each command it queues."""
    rec = recorder()
    server = PDAsyncEngine.__new__(PDAsyncEngine)  # skip __init__: it snapshots an engine
    server.engine, server._cmds = rec, queue.SimpleQueue()
    server.abort(["r1", "r2"])
    assert server._cmds.get_nowait() == ("abort", ["r1", "r2"])
    assert rec.events.get_nowait() is worker._WAKE
    assert rec.events.empty()
