"""The PD control plane over loopback pyzmq: ordered typed messages both ways, heartbeats
consumed, silent and disconnected peers reported, bad frames dropped."""

from __future__ import annotations

import queue
import time

import pytest
import zmq

from swakv.disagg.control import ControlPlane, PeerLost, Received, is_control_address
from swakv.disagg.messages import Abort


def next_event(cp: ControlPlane, timeout: float = 5.0):
    return cp.events.get(timeout=timeout)


@pytest.fixture
def planes():
    made = []

    def make(*args, **kw):
        cp = ControlPlane(*args, **kw)
        made.append(cp)
        return cp

    yield make
    for cp in made:
        cp.close()


def test_messages_flow_in_order_both_ways(planes):
    server = planes("prefill-a", listen="tcp://127.0.0.1:0", heartbeat_interval=0.05,
                    peer_timeout=5)
    client = planes("decode-a", heartbeat_interval=0.05, peer_timeout=5)
    assert server.address.startswith("tcp://127.0.0.1:")
    client.connect(server.address)
    for i in range(100):
        client.send(server.address, Abort(f"r{i}", "x"))
    got = [next_event(server) for _ in range(100)]
    assert got == [Received("decode-a", Abort(f"r{i}", "x")) for i in range(100)]
    server.send("decode-a", Abort("back", "y"))
    assert next_event(client) == Received(server.address, Abort("back", "y"))
    time.sleep(0.3)  # several heartbeats each way: consumed, never forwarded
    assert server.events.empty() and client.events.empty()


def test_a_silent_peer_is_lost(planes):
    server = planes("prefill-b", listen="tcp://127.0.0.1:0", heartbeat_interval=0.05,
                    peer_timeout=0.5)
    client = planes("decode-b", heartbeat_interval=0.05, peer_timeout=5)
    client.connect(server.address)
    client.send(server.address, Abort("hello", "x"))
    assert next_event(server) == Received("decode-b", Abort("hello", "x"))
    t0 = time.monotonic()
    client.close()
    assert next_event(server) == PeerLost("decode-b", "silent for 0.5 s")
    assert time.monotonic() - t0 < 3


def test_a_closed_listener_is_lost_at_once(planes):
    server = planes("prefill-c", listen="tcp://127.0.0.1:0", heartbeat_interval=0.05,
                    peer_timeout=30)
    client = planes("decode-c", heartbeat_interval=0.05, peer_timeout=30)
    client.connect(server.address)
    client.send(server.address, Abort("hello", "x"))
    next_event(server)
    time.sleep(0.2)  # the server's heartbeats reach the client: it has answered
    t0 = time.monotonic()
    server.close()
    assert next_event(client) == PeerLost(server.address, "connection closed")
    assert time.monotonic() - t0 < 2


def test_a_handshake_nobody_answers_times_out(planes):
    with zmq.Context() as ctx, ctx.socket(zmq.REP) as probe:
        port = probe.bind_to_random_port("tcp://127.0.0.1")
    client = planes("decode-d", heartbeat_interval=0.05, peer_timeout=0.4)
    client.connect(f"tcp://127.0.0.1:{port}")  # nothing listens there any more
    assert next_event(client) == PeerLost(f"tcp://127.0.0.1:{port}", "silent for 0.4 s")


def test_bad_frames_are_dropped_and_counted(planes):
    server = planes("prefill-e", listen="tcp://127.0.0.1:0", heartbeat_interval=0.05,
                    peer_timeout=5)
    with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as raw:
        raw.setsockopt(zmq.LINGER, 1000)
        raw.connect(server.address)
        raw.send(b"not json")
        raw.send(b'{"type": "abort", "v": 1, "request_id": "r", "reason": "ok"}')
        event = next_event(server)
    assert isinstance(event, Received) and event.message == Abort("r", "ok")
    assert server.num_bad_frames == 1
    with pytest.raises(queue.Empty):
        server.events.get(timeout=0.2)


def test_forgotten_peers_are_not_reported(planes):
    client = planes("decode-f", heartbeat_interval=0.05, peer_timeout=0.3)
    client.connect("tcp://127.0.0.1:9")
    client.forget("tcp://127.0.0.1:9")
    with pytest.raises(queue.Empty):
        client.events.get(timeout=0.6)


def test_timing_must_make_sense():
    with pytest.raises(ValueError):
        ControlPlane("x", heartbeat_interval=1.0, peer_timeout=1.0)


@pytest.mark.parametrize("address,ok", [
    ("tcp://127.0.0.1:5555", True), ("tcp://prefill-0.local:1", True), ("tcp://[::1]:80", True),
    ("garbage", False), ("tcp://nohost", False), ("tcp://:5555", False),
    ("tcp://h:0", False), ("tcp://h:65536", False), ("tcp://h:-1", False), ("ipc://x:1", False),
])
def test_control_addresses(address, ok):
    assert is_control_address(address) is ok


def test_an_address_zmq_refuses_is_a_lost_peer_and_the_plane_goes_on(planes):
    server = planes("prefill-g", listen="tcp://127.0.0.1:0", heartbeat_interval=0.05,
                    peer_timeout=5)
    client = planes("decode-g", heartbeat_interval=0.05, peer_timeout=5)
    client.connect("not an address")
    assert next_event(client) == PeerLost(
        "not an address", "cannot connect: Invalid argument (addr='not an address')")
    client.connect(server.address)  # the control thread still runs
    client.send(server.address, Abort("after", "x"))
    assert next_event(server) == Received("decode-g", Abort("after", "x"))
    server.send("decode-g", Abort("back", "y"))
    assert next_event(client) == Received(server.address, Abort("back", "y"))
