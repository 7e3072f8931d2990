"""Typed control-plane messages between PD workers and their wire codec (JSON, no pickle).

Wire format: one zmq frame per message, a UTF-8 JSON object
`{"type": <tag>, "v": PROTOCOL_VERSION, <field>: <value>, ...}` where tuples are
lists, enums their values, nested dataclasses objects, None null. `decode` checks
the tag, the version, that the fields are exactly the dataclass's, and every
value's type (ints are never bools, floats finite), then runs the dataclass's own
validation; any failure raises MessageError.

Flow for one request (router -> decode worker D, prefill worker P):
- each worker sends its `Bootstrap` once to its peers (transfer-engine info and KV
  registration: base addresses, strides, page size, layer layout), then
  `Heartbeat`s;
- D preallocates and sends P a `Prealloc`: decode-side prefix hit, destination
  full pages for [prefix, L) and SWA pages for the tail (both from
  `plan.plan_transfer`), an optional staging range, and what P needs to compute
  the prompt and sample the first token;
- P computes, writes KV into D's pages, then sends `KVWritten` with the first
  output token (`staged`: D must unpack its staging range first);
- either side may send `Abort`. D must not reuse the destination pages of a
  request P may still be writing until P's KVWritten or Abort for it arrives.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import dataclass, fields, is_dataclass
from enum import Enum, StrEnum

import zmq

from swakv.disagg.descriptors import KVRegions, LayoutMismatch, TensorRegion
from swakv.disagg.plan import TransferPlan, plan_transfer
from swakv.sampling_params import SamplingParams

if typing.TYPE_CHECKING:
    from swakv.memory.kv_pool import KVPool

PROTOCOL_VERSION = 1


class MessageError(ValueError):
    """A frame that is not a valid message (unknown type, wrong fields or types, bad values)."""


class Role(StrEnum):
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass(frozen=True)
class LayerLayout:
    """One layer's KV shape (per global layer id)."""

    sliding: bool
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class KVRegistration:
    """What a peer needs to address this worker's KV: layout, pool regions, staging."""

    page_size: int
    dtype: str  # torch dtype name, e.g. "bfloat16"
    window: int | None
    layers: tuple[LayerLayout, ...]
    regions: KVRegions
    staging: TensorRegion | None = None

    def __post_init__(self) -> None:
        if self.page_size != self.regions.page_size:
            raise ValueError(f"page_size {self.page_size} vs regions' {self.regions.page_size}")
        num_sliding = sum(a.sliding for a in self.layers)
        if (len(self.regions.swa), len(self.regions.full)) != (
                2 * num_sliding, 2 * (len(self.layers) - num_sliding)):
            raise ValueError("regions do not hold K and V of every layer")

    @classmethod
    def of(cls, pool: KVPool, staging: TensorRegion | None = None) -> KVRegistration:
        """Registration of a `swakv.memory.kv_pool.KVPool` (and its staging area region)."""
        layout = pool.layout
        return cls(
            page_size=pool.allocator.page_size,
            dtype=str(layout.dtype).removeprefix("torch."),
            window=layout.window,
            layers=tuple(LayerLayout(a.is_sliding, a.num_kv_heads, a.head_dim)
                         for a in layout.layers),
            regions=KVRegions.of(pool),
            staging=staging,
        )

    def check_compatible(self, other: KVRegistration) -> None:
        """Raise LayoutMismatch unless the two workers can exchange pages."""
        for name in ("page_size", "dtype", "window", "layers"):
            if getattr(self, name) != getattr(other, name):
                raise LayoutMismatch(f"{name}: {getattr(self, name)} vs {getattr(other, name)}")
        self.regions.check_compatible(other.regions)


@dataclass(frozen=True)
class Bootstrap:
    """A worker introducing itself to a peer (also the answer to one)."""

    worker_id: str
    role: Role
    zmq_address: str
    transfer_backend: str  # e.g. "mooncake"
    transfer_peer_info: str  # what the backend's register() returned
    kv: KVRegistration


@dataclass(frozen=True)
class Prealloc:
    """Decode -> prefill: where to write one request's KV, and what to compute.

    `dst_full_pages` hold positions [prefix_len, L) and `dst_swa_pages` the SWA span
    of `plan_transfer(prefix_len, L, W, P)`, L = len(prompt_token_ids), one page per
    page of the span in position order. `staging_offset`: a range of the decode
    worker's staging area lent to this request, or None.
    """

    request_id: str
    decode_worker_id: str
    prompt_token_ids: tuple[int, ...]
    prefix_len: int
    dst_full_pages: tuple[int, ...]
    dst_swa_pages: tuple[int, ...]
    staging_offset: int | None
    sampling: SamplingParams

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError("empty prompt")
        if not 0 <= self.prefix_len <= len(self.prompt_token_ids):
            raise ValueError(f"prefix_len {self.prefix_len} outside the prompt")
        if any(t < 0 for t in self.prompt_token_ids):
            raise ValueError("negative token id")
        if any(p < 1 for p in self.dst_full_pages + self.dst_swa_pages):
            raise ValueError("destination pages must be >= 1 (page 0 is padding)")
        if self.staging_offset is not None and self.staging_offset < 0:
            raise ValueError(f"staging_offset {self.staging_offset} < 0")

    def transfer_plan(self, window: int | None, page_size: int) -> TransferPlan:
        """The shared plan; MessageError if the page lists do not match it."""
        plan = plan_transfer(self.prefix_len, len(self.prompt_token_ids), window, page_size)
        if (len(self.dst_full_pages), len(self.dst_swa_pages)) != (
                plan.full.num_pages, plan.swa.num_pages):
            raise MessageError(
                f"request {self.request_id}: {len(self.dst_full_pages)} full and "
                f"{len(self.dst_swa_pages)} SWA pages, the plan has {plan.full.num_pages} "
                f"and {plan.swa.num_pages}")
        return plan


@dataclass(frozen=True)
class KVWritten:
    """Prefill -> decode: every byte of the request's KV is in place."""

    request_id: str
    num_tokens: int  # prompt tokens whose KV the decode worker now holds (L)
    first_token_id: int  # the first output token, sampled by the prefill worker
    staged: bool = False  # the KV is in the lent staging range: unpack before decoding

    def __post_init__(self) -> None:
        if self.num_tokens < 1 or self.first_token_id < 0:
            raise ValueError(f"num_tokens {self.num_tokens}, first token {self.first_token_id}")


@dataclass(frozen=True)
class Abort:
    request_id: str
    reason: str


@dataclass(frozen=True)
class Heartbeat:
    worker_id: str
    seq: int
    sent_at: float  # time.time() of the sender

    def __post_init__(self) -> None:
        if self.seq < 0:
            raise ValueError(f"seq {self.seq} < 0")


Message = Bootstrap | Prealloc | KVWritten | Abort | Heartbeat
MESSAGE_TYPES: dict[str, type] = {
    "bootstrap": Bootstrap,
    "prealloc": Prealloc,
    "kv_written": KVWritten,
    "abort": Abort,
    "heartbeat": Heartbeat,
}
_TAGS = {cls: tag for tag, cls in MESSAGE_TYPES.items()}
_HINTS: dict[type, dict[str, typing.Any]] = {}


def encode(msg: Message) -> bytes:
    tag = _TAGS.get(type(msg))
    if tag is None:
        raise MessageError(f"not a message: {type(msg).__name__}")
    body = {"type": tag, "v": PROTOCOL_VERSION, **_to_json(msg)}
    try:
        return json.dumps(body, allow_nan=False, separators=(",", ":")).encode()
    except ValueError as e:  # NaN / infinity
        raise MessageError(f"{tag}: {e}") from e


def decode(frame: bytes) -> Message:
    try:
        body = json.loads(frame, parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise MessageError(f"frame is not JSON: {e}") from e
    if not isinstance(body, dict):
        raise MessageError("frame is not a JSON object")
    tag, version = body.pop("type", None), body.pop("v", None)
    if not isinstance(tag, str) or tag not in MESSAGE_TYPES:
        raise MessageError(f"unknown message type {tag!r}")
    if version != PROTOCOL_VERSION:
        raise MessageError(f"{tag}: protocol version {version!r}, expected {PROTOCOL_VERSION}")
    return _from_json(MESSAGE_TYPES[tag], body, tag)


def send_message(socket: zmq.Socket, msg: Message, flags: int = 0) -> None:
    socket.send(encode(msg), flags)


def recv_message(socket: zmq.Socket, flags: int = 0) -> Message:
    return decode(socket.recv(flags))


def _reject_constant(name: str) -> float:
    raise MessageError(f"non-finite number {name}")


def _to_json(value: typing.Any) -> typing.Any:
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_json(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, tuple):
        return [_to_json(v) for v in value]
    if isinstance(value, Enum):
        return value.value
    return value


def _hints(cls: type) -> dict[str, typing.Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _from_json(tp: typing.Any, value: typing.Any, path: str) -> typing.Any:
    """`value` (parsed JSON) as an instance of type hint `tp`, or MessageError naming `path`."""
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]  # only `X | None` is used
        return _from_json(inner, value, path)
    if origin is tuple:
        item, ellipsis = typing.get_args(tp)
        assert ellipsis is Ellipsis, f"{path}: only tuple[X, ...] fields are supported"
        if not isinstance(value, list):
            raise MessageError(f"{path}: expected a list, got {type(value).__name__}")
        return tuple(_from_json(item, v, f"{path}[{i}]") for i, v in enumerate(value))
    if isinstance(tp, type) and is_dataclass(tp):
        return _dataclass_from_json(tp, value, path)
    if isinstance(tp, type) and issubclass(tp, Enum):
        try:
            return tp(value)
        except ValueError as e:
            raise MessageError(f"{path}: {value!r} is not a {tp.__name__}") from e
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool) and type(value) is tp:
        return value
    raise MessageError(f"{path}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def _dataclass_from_json(cls: type, value: typing.Any, path: str) -> typing.Any:
    if not isinstance(value, dict):
        raise MessageError(f"{path}: expected an object, got {type(value).__name__}")
    names = [f.name for f in fields(cls)]
    missing, extra = set(names) - value.keys(), value.keys() - set(names)
    if missing or extra:
        raise MessageError(f"{path}: missing fields {sorted(missing)}, unknown {sorted(extra)}")
    hints = _hints(cls)
    kwargs = {n: _from_json(hints[n], value[n], f"{path}.{n}") for n in names}
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise MessageError(f"{path}: {e}") from e
