"""Control-plane messages: round trips, the exact wire form, rejection of malformed
frames with MessageError, layout compatibility, and a real pyzmq socket pair."""

from __future__ import annotations

import json

import pytest
import torch
import zmq

from swakv.config import AttentionSpec, AttnKind, KVLayout
from swakv.disagg.descriptors import KVRegions, LayoutMismatch, TensorRegion
from swakv.disagg.messages import (
    PROTOCOL_VERSION,
    Abort,
    Bootstrap,
    Heartbeat,
    KVRegistration,
    KVWritten,
    LayerLayout,
    MessageError,
    Prealloc,
    Role,
    decode,
    encode,
    recv_message,
    send_message,
)
from swakv.memory.allocator import SWAAllocator
from swakv.memory.kv_pool import KVPool
from swakv.sampling_params import SamplingParams


def make_pool(page: int = 4, window: int = 3, dtype=torch.bfloat16) -> KVPool:
    sw = AttentionSpec(AttnKind.SLIDING, 1, 4, 10_000.0, window=window)
    full = AttentionSpec(AttnKind.FULL, 2, 4, 1_000_000.0)
    return KVPool(KVLayout(layers=(sw, full, sw), dtype=dtype), SWAAllocator(8, 6, page))


def registration(**kw) -> KVRegistration:
    pool = make_pool(**kw)
    staging = torch.zeros(4096, dtype=torch.uint8)
    return KVRegistration.of(pool, TensorRegion.of(staging))


def all_messages() -> list:
    return [
        Bootstrap("decode-0", Role.DECODE, "tcp://127.0.0.1:5555", "mooncake",
                  "127.0.0.1:15321", registration()),
        Prealloc("req-1", "decode-0", (2, 651, 9, 4, 88), 0, (7, 3, 4), (5, 2), 8192,
                 SamplingParams(temperature=0.7, top_p=0.9, seed=11, max_tokens=32,
                                stop=("\n\n",), stop_token_ids=(1, 106), logprobs=2)),
        Prealloc("req-2", "decode-1", (2, 3), 0, (1,), (), None, SamplingParams()),
        KVWritten("req-1", 5, 4321, staged=True),
        Abort("req-1", "client disconnected"),
        Heartbeat("prefill-0", 17, 1_764_000_000.25),
    ]


@pytest.mark.parametrize("msg", all_messages(), ids=lambda m: type(m).__name__)
def test_round_trip(msg) -> None:
    frame = encode(msg)
    assert isinstance(frame, bytes)
    back = decode(frame)
    assert back == msg and type(back) is type(msg)


def test_exact_wire_form() -> None:
    assert encode(Abort("r", "gone")) == (
        b'{"type":"abort","v":1,"request_id":"r","reason":"gone"}')
    assert json.loads(encode(KVWritten("r", 3, 7))) == {
        "type": "kv_written", "v": PROTOCOL_VERSION, "request_id": "r", "num_tokens": 3,
        "first_token_id": 7, "staged": False}
    body = json.loads(encode(all_messages()[0]))
    assert body["role"] == "decode"
    kv = body["kv"]
    assert kv["page_size"] == 4 and kv["dtype"] == "bfloat16" and kv["window"] == 3
    assert kv["layers"] == [
        {"sliding": True, "num_kv_heads": 1, "head_dim": 4},
        {"sliding": False, "num_kv_heads": 2, "head_dim": 4},
        {"sliding": True, "num_kv_heads": 1, "head_dim": 4}]
    assert [r["slot_nbytes"] for r in kv["regions"]["full"]] == [16, 16]
    assert [r["num_slots"] for r in kv["regions"]["swa"]] == [28] * 4
    assert kv["staging"]["num_slots"] == 4096 and kv["staging"]["slot_nbytes"] == 1


def frame_with(msg, **changes) -> bytes:
    body = json.loads(encode(msg))
    for key, value in changes.items():
        if value is DELETE:
            del body[key]
        else:
            body[key] = value
    return json.dumps(body).encode()


DELETE = object()
KVW = KVWritten("r", 3, 7)
PRE = all_messages()[1]


@pytest.mark.parametrize("frame,match", [
    (b"not json", "not JSON"),
    (b"\xff\xfe", "not JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b'{"v": 1}', "unknown message type None"),
    (frame_with(KVW, type="kv_read"), "unknown message type 'kv_read'"),
    (frame_with(KVW, v=2), "protocol version 2"),
    (frame_with(KVW, v=DELETE), "protocol version None"),
    (frame_with(KVW, num_tokens=DELETE), r"missing fields \['num_tokens'\]"),
    (frame_with(KVW, extra=1), r"unknown \['extra'\]"),
    (frame_with(KVW, num_tokens="3"), "kv_written.num_tokens: expected int"),
    (frame_with(KVW, num_tokens=3.0), "kv_written.num_tokens: expected int"),
    (frame_with(KVW, first_token_id=True), "expected int, got True"),
    (frame_with(KVW, staged=1), "kv_written.staged: expected bool"),
    (frame_with(KVW, num_tokens=0), "num_tokens 0"),
    (b'{"type":"heartbeat","v":1,"worker_id":"w","seq":1,"sent_at":NaN}', "non-finite"),
    (b'{"type":"heartbeat","v":1,"worker_id":"w","seq":-1,"sent_at":1}', "seq -1"),
    (frame_with(PRE, prompt_token_ids=[1, "2"]), r"prompt_token_ids\[1\]: expected int"),
    (frame_with(PRE, dst_full_pages=7), "dst_full_pages: expected a list"),
    (frame_with(PRE, dst_swa_pages=[0]), "page 0 is padding"),
    (frame_with(PRE, prefix_len=9), "prefix_len 9 outside the prompt"),
    (frame_with(PRE, staging_offset="x"), "staging_offset: expected int"),
    (frame_with(PRE, sampling={**json.loads(encode(PRE))["sampling"], "temperature": -1}),
     "temperature must be >= 0"),
    (frame_with(PRE, sampling={"temperature": 1.0}), "prealloc.sampling: missing fields"),
    (frame_with(all_messages()[0], role="router"), "'router' is not a Role"),
])
def test_malformed_frames_raise_message_error(frame: bytes, match: str) -> None:
    with pytest.raises(MessageError, match=match):
        decode(frame)


def test_nested_region_validation_and_encode_errors() -> None:
    body = json.loads(encode(all_messages()[0]))
    body["kv"]["regions"]["full"][0]["addr"] = 0
    with pytest.raises(MessageError, match="invalid tensor region"):
        decode(json.dumps(body).encode())
    body = json.loads(encode(all_messages()[0]))
    body["kv"]["regions"]["swa"] = body["kv"]["regions"]["swa"][:2]
    with pytest.raises(MessageError, match="regions do not hold K and V of every layer"):
        decode(json.dumps(body).encode())
    with pytest.raises(MessageError, match="not a message: dict"):
        encode({"type": "abort"})  # type: ignore[arg-type]
    with pytest.raises(MessageError, match="heartbeat"):
        encode(Heartbeat("w", 1, float("inf")))


def test_prealloc_transfer_plan_checks_page_counts() -> None:
    # L = 5, page 4, W 3: full [0, 5) = 2 pages; SWA [0, 5) (page_floor(2) = 0) = 2 pages
    msg = Prealloc("r", "d", (1, 2, 3, 4, 5), 0, (3, 9), (1, 2), None, SamplingParams())
    plan = msg.transfer_plan(window=3, page_size=4)
    assert (plan.full.num_pages, plan.swa.num_pages, plan.swa.start) == (2, 2, 0)
    with pytest.raises(MessageError, match="2 full and 2 SWA pages, the plan has 2 and 0"):
        msg.transfer_plan(window=None, page_size=4)


def test_registration_compatibility() -> None:
    a = registration()
    a.check_compatible(registration())  # same layout, other addresses
    with pytest.raises(LayoutMismatch, match="dtype"):
        a.check_compatible(registration(dtype=torch.float32))
    with pytest.raises(LayoutMismatch, match="window"):
        a.check_compatible(registration(window=5))
    with pytest.raises(LayoutMismatch, match="page_size"):
        a.check_compatible(registration(page=2))
    other = KVRegistration(4, "bfloat16", 3, a.layers,
                           KVRegions(4, a.regions.full, a.regions.swa[:2] + a.regions.full),
                           None)
    with pytest.raises(LayoutMismatch, match="swa tensor 2: 8 vs 16 bytes per slot"):
        a.check_compatible(other)
    assert a.layers[1] == LayerLayout(False, 2, 4)


def test_messages_over_a_real_zmq_socket_pair() -> None:
    ctx = zmq.Context()
    server, client = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        for s in (server, client):
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.RCVTIMEO, 5000)
        port = server.bind_to_random_port("tcp://127.0.0.1")
        client.connect(f"tcp://127.0.0.1:{port}")
        sent = all_messages()
        for msg in sent:
            send_message(client, msg)
        assert [recv_message(server) for _ in sent] == sent
        # answers flow back the other way; a malformed frame is refused, not unpickled
        send_message(server, KVWritten("req-1", 5, 4321))
        assert recv_message(client) == KVWritten("req-1", 5, 4321)
        client.send(b'{"type":"exec","v":1}')
        with pytest.raises(MessageError, match="unknown message type 'exec'"):
            recv_message(server)
    finally:
        server.close()
        client.close()
        ctx.term()
