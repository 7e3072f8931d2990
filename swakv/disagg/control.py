"""The PD control plane: one pyzmq endpoint per worker, owned by its own thread.

Topology: a prefill worker binds a ROUTER socket (`listen`); a decode worker opens
one DEALER per prefill worker it uses (`connect(address)`, identity = its worker
id). Messages are `messages.Message`s, one frame each; a DEALER/ROUTER pair keeps
them in order. Peer names: on the ROUTER side the DEALER's identity (the decode
worker id), on the DEALER side the prefill worker's address.

Liveness: every `heartbeat_interval` s each side sends a `Heartbeat` to every peer
it knows; any message refreshes the sender's last-seen time. A peer silent for
`peer_timeout` s (a DEALER also: from `connect` on, so a handshake that never
completes times out), or whose DEALER connection closes after it has answered (a
socket monitor sees the dead process at once), is reported as `PeerLost` and
forgotten. Heartbeats are consumed here; every other message goes to `events` as
`Received`, for the engine thread.

Threading: zmq sockets are used by the control thread only; `send`, `connect` and
`forget` may be called from any thread (they queue a command and wake the thread
through a pipe).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass

import zmq
from zmq.utils.monitor import recv_monitor_message

from swakv.disagg.messages import Heartbeat, Message, MessageError, decode, encode

log = logging.getLogger("swakv.disagg")


def is_control_address(address: str) -> bool:
    """`tcp://HOST:PORT` with a port in [1, 65535]: what a listening plane advertises."""
    host, sep, port = address.removeprefix("tcp://").rpartition(":")
    return (address.startswith("tcp://") and bool(sep and host) and port.isdigit()
            and 1 <= int(port) <= 65535)


@dataclass(frozen=True)
class Received:
    peer: str
    message: Message


@dataclass(frozen=True)
class PeerLost:
    peer: str
    reason: str


@dataclass
class _Peer:
    last_seen: float
    answered: bool = False  # a message arrived from it (DEALER: the handshake went through)
    dealer: zmq.Socket | None = None
    monitor: zmq.Socket | None = None


class ControlPlane:
    """A worker's control endpoint; `events` receives Received / PeerLost."""

    def __init__(self, worker_id: str, listen: str | None = None,
                 heartbeat_interval: float = 1.0, peer_timeout: float = 10.0,
                 events: queue.SimpleQueue | None = None) -> None:
        if heartbeat_interval <= 0 or peer_timeout <= heartbeat_interval:
            raise ValueError("need 0 < heartbeat_interval < peer_timeout")
        self.worker_id = worker_id
        self.heartbeat_interval, self.peer_timeout = heartbeat_interval, peer_timeout
        self.events: queue.SimpleQueue = events if events is not None else queue.SimpleQueue()
        self.num_bad_frames = 0
        self._ctx = zmq.Context()
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        self._peers: dict[str, _Peer] = {}  # control thread only
        self._router: zmq.Socket | None = None
        self.address: str | None = None
        if listen is not None:
            self._router = self._ctx.socket(zmq.ROUTER)
            self._router.setsockopt(zmq.LINGER, 0)
            self._router.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted peer takes over
            host, _, port = listen.removeprefix("tcp://").rpartition(":")
            if port in ("", "0"):
                port = str(self._router.bind_to_random_port(f"tcp://{host}"))
            else:
                self._router.bind(f"tcp://{host}:{port}")
            self.address = f"tcp://{host}:{port}"
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="swakv-pd-control", daemon=True)
        self._thread.start()

    # ---- any thread -----------------------------------------------------------------
    def send(self, peer: str, msg: Message) -> None:
        self._command(("send", peer, encode(msg)))

    def connect(self, address: str) -> None:
        """Open a DEALER to a listening worker (no-op if it is already connected); an
        address zmq refuses is reported as PeerLost."""
        self._command(("connect", address))

    def forget(self, peer: str) -> None:
        """Stop tracking a peer (close its DEALER); no PeerLost is reported for it."""
        self._command(("forget", peer))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._cmds.put(("stop",))
        os.write(self._wake_w, b"x")
        self._thread.join(10)
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)

    def _command(self, cmd: tuple) -> None:
        if self._closed:
            return
        self._cmds.put(cmd)
        os.write(self._wake_w, b"x")

    # ---- control thread ---------------------------------------------------------------
    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._wake_r, zmq.POLLIN)
        if self._router is not None:
            poller.register(self._router, zmq.POLLIN)
        next_beat, seq = time.monotonic(), 0
        try:
            while True:
                timeout_ms = max(0.0, (next_beat - time.monotonic()) * 1000)
                ready = dict(poller.poll(timeout_ms))
                if self._wake_r in ready:
                    os.read(self._wake_r, 4096)
                    if not self._run_commands(poller):
                        return
                if self._router is not None and self._router in ready:
                    self._drain(self._router, None)
                for name, peer in list(self._peers.items()):
                    if peer.dealer is not None and peer.dealer in ready:
                        self._drain(peer.dealer, name)
                    if peer.monitor is not None and peer.monitor in ready:
                        self._watch(poller, name, peer)
                now = time.monotonic()
                if now >= next_beat:
                    self._beat(poller, seq, now)
                    seq += 1
                    next_beat = now + self.heartbeat_interval
        except Exception:  # the engine must hear that nobody can be reached any more
            log.exception("PD control thread died")
            for name in list(self._peers):
                self.events.put(PeerLost(name, "control plane failed"))
        finally:
            for name in list(self._peers):
                self._close_peer(poller, name)
            if self._router is not None:
                self._router.close(0)
            self._ctx.term()

    def _run_commands(self, poller: zmq.Poller) -> bool:
        while True:
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                return True
            if cmd[0] == "stop":
                return False
            if cmd[0] == "send":
                self._send(cmd[1], cmd[2])
            elif cmd[0] == "connect":
                self._open_dealer(poller, cmd[1])
            elif cmd[0] == "forget":
                self._close_peer(poller, cmd[1])

    def _send(self, peer: str, frame: bytes) -> None:
        entry = self._peers.get(peer)
        try:
            if entry is not None and entry.dealer is not None:
                entry.dealer.send(frame, zmq.NOBLOCK)
            elif self._router is not None:
                self._router.send_multipart([peer.encode(), frame], zmq.NOBLOCK)
            else:
                log.debug("dropping a message to unknown peer %s", peer)
        except zmq.Again:
            log.warning("control message to %s dropped: its queue is full", peer)

    def _open_dealer(self, poller: zmq.Poller, address: str) -> None:
        if address in self._peers:
            return
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IDENTITY, self.worker_id.encode())
        monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        try:
            sock.connect(address)
        except zmq.ZMQError as e:  # a malformed address: that peer is lost, not the plane
            sock.disable_monitor()
            monitor.close(0)
            sock.close(0)
            self.events.put(PeerLost(address, f"cannot connect: {e}"))
            return
        poller.register(sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        self._peers[address] = _Peer(time.monotonic(), dealer=sock, monitor=monitor)

    def _close_peer(self, poller: zmq.Poller, name: str) -> None:
        peer = self._peers.pop(name, None)
        if peer is None or peer.dealer is None:
            return
        poller.unregister(peer.dealer)
        poller.unregister(peer.monitor)
        peer.dealer.disable_monitor()
        peer.monitor.close(0)
        peer.dealer.close(0)

    def _drain(self, sock: zmq.Socket, name: str | None) -> None:
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            peer = name if name is not None else frames[0].decode(errors="replace")
            try:
                msg = decode(frames[-1])
            except MessageError as e:
                self.num_bad_frames += 1
                log.warning("bad control frame from %s: %s", peer, e)
                continue
            entry = self._peers.get(peer)
            if entry is None:
                if name is not None:  # a DEALER being closed
                    continue
                entry = self._peers[peer] = _Peer(time.monotonic())
            entry.last_seen, entry.answered = time.monotonic(), True
            if not isinstance(msg, Heartbeat):
                self.events.put(Received(peer, msg))

    def _watch(self, poller: zmq.Poller, name: str, peer: _Peer) -> None:
        event = recv_monitor_message(peer.monitor)
        if event["event"] == zmq.EVENT_DISCONNECTED and peer.answered:
            self._close_peer(poller, name)
            self.events.put(PeerLost(name, "connection closed"))

    def _beat(self, poller: zmq.Poller, seq: int, now: float) -> None:
        frame = encode(Heartbeat(self.worker_id, seq, time.time()))
        for name, peer in list(self._peers.items()):
            if now - peer.last_seen > self.peer_timeout:
                self._close_peer(poller, name)  # forgets it (either side)
                self.events.put(PeerLost(name, f"silent for {self.peer_timeout:g} s"))
            else:
                self._send(name, frame)
