"""Frozen configuration dataclasses: model spec and attention kinds.

Attention kinds are data: every layer names an `AttentionSpec`; code that needs to
treat full and sliding layers differently reads the spec, never the layer index.
"""

from __future__ import annotations

import functools
import platform
import re
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import torch


class AttnKind(StrEnum):
    FULL = "full"
    SLIDING = "sliding"


@dataclass(frozen=True)
class AttentionSpec:
    """One kind of attention layer.

    A SLIDING layer with window W lets the query at position i see keys at positions
    j with i - W < j <= i (Gemma 3 / Hugging Face convention: W keys including i).
    """

    kind: AttnKind
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    window: int | None = None  # set iff kind is SLIDING
    rope_scaling_factor: float = 1.0  # linear RoPE scaling (positions divided by it)

    def __post_init__(self) -> None:
        if (self.kind is AttnKind.SLIDING) != (self.window is not None):
            raise ValueError(f"window must be set exactly for sliding layers: {self}")
        if self.window is not None and self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")

    @property
    def is_sliding(self) -> bool:
        return self.kind is AttnKind.SLIDING


@dataclass(frozen=True)
class ModelSpec:
    """Everything the pools, the model code and the scheduler need to know of a model.

    `layers[i]` is the attention spec of global layer i. All sliding layers share one
    window (one SWA pool); `window` returns it.
    """

    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    layers: tuple[AttentionSpec, ...]
    rms_norm_eps: float = 1e-6
    query_pre_attn_scalar: float | None = None  # attention scale = scalar**-0.5
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        windows = {a.window for a in self.layers if a.is_sliding}
        if len(windows) > 1:
            raise ValueError(f"all sliding layers must share one window, got {sorted(windows)}")

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def window(self) -> int | None:
        """The sliding window W, or None for a model without sliding layers."""
        for a in self.layers:
            if a.is_sliding:
                return a.window
        return None

    @property
    def full_layer_ids(self) -> tuple[int, ...]:
        return tuple(i for i, a in enumerate(self.layers) if not a.is_sliding)

    @property
    def swa_layer_ids(self) -> tuple[int, ...]:
        return tuple(i for i, a in enumerate(self.layers) if a.is_sliding)


@dataclass(frozen=True)
class KVLayout:
    """What the KV pools store: per global layer, which pool and the K/V shape.

    Built from a ModelSpec with `KVLayout.from_model(spec, dtype)`.
    """

    layers: tuple[AttentionSpec, ...]
    dtype: torch.dtype = torch.float32

    @classmethod
    def from_model(cls, spec: ModelSpec, dtype: torch.dtype = torch.float32) -> KVLayout:
        return cls(layers=spec.layers, dtype=dtype)

    @property
    def window(self) -> int | None:
        for a in self.layers:
            if a.is_sliding:
                return a.window
        return None

    @property
    def index_in_pool(self) -> tuple[int, ...]:
        """index_in_pool[g] = index of global layer g among its pool's layers (full or SWA)."""
        counters = {False: 0, True: 0}
        index = []
        for a in self.layers:
            index.append(counters[a.is_sliding])
            counters[a.is_sliding] += 1
        return tuple(index)

    def bytes_per_token(self, sliding: bool) -> int:
        """K+V bytes one token costs across all layers of one pool."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        return sum(
            2 * a.num_kv_heads * a.head_dim * elem for a in self.layers if a.is_sliding == sliding
        )


QUANTIZATION_MODES = ("none", "int8", "int4", "w8a8")  # swakv.model.quant.Quantization


def config_field(text: str, aliases: tuple[str, ...] = (), parse=None, **kw):
    """A dataclass field with `--help` text (the CLI builds its flags from these).

    `aliases`: extra flag names users know from other engines (vLLM, SGLang,
    llama-server) that set this same field; `parse`: the CLI's parser for the flag's
    text (default: from the field's type).
    """
    return field(metadata={"help": text, "aliases": aliases, "parse": parse}, **kw)


_help = config_field


MIB = 1 << 20
KV_MEMORY_FORMS = ("a size like 4GiB, 512MiB or 2e9 (bytes, at least 1 MiB), or a fraction of "
                   "currently available RAM written with a decimal point like 0.25")
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([kmgt]?)(i?)b?\s*$", re.I)


def parse_size(text: str) -> float:
    """A float, optionally with a size suffix: '0.25', '2e9', '512M', '2GiB' (= 2 * 2**30).

    K/M/G/T are decimal (1000**k) unless followed by 'i' (1024**k). ValueError otherwise.
    """
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"not a number or size: {text!r}")
    value, unit, binary = float(m.group(1)), m.group(2).lower(), m.group(3)
    power = " kmgt".index(unit) if unit else 0
    return value * (1024 if binary else 1000) ** power


def parse_kv_memory(text: str) -> float:
    """`--kv-memory`: bytes (a size, >= 1 MiB) or a fraction in (0, 1] written with a '.'.

    '4GiB' -> 4 * 2**30; '0.25' -> 0.25; '1.0' -> 1.0 (all available RAM); '1', '2' or
    '4096' (a bare integer below 1 MiB, i.e. a few bytes) -> ValueError showing the
    accepted forms, because '1' reads as "all RAM" to some and as one byte to others.
    """
    try:
        value = parse_size(text)
    except ValueError:
        raise ValueError(f"--kv-memory {text!r}: expected {KV_MEMORY_FORMS}") from None
    is_fraction = "." in text and not any(c.isalpha() for c in text) and value <= 1
    if is_fraction and value > 0:
        return value
    if value < MIB:
        raise ValueError(f"--kv-memory {text!r} is {value:g} bytes; expected {KV_MEMORY_FORMS}")
    return value


DTYPES = ("auto", "float32", "bfloat16")


@dataclass(frozen=True)
class DtypeChoice:
    """What `--dtype` resolved to and why (logged at start-up)."""

    name: str  # "float32" or "bfloat16"
    reason: str


def native_bf16_supported() -> bool:
    """Whether this machine's CPU computes bf16 natively (x86: AVX512-BF16 or AMX; Arm:
    the BF16 extension). Without it bf16 is emulated and slower than float32."""
    return _cpu_native_bf16()


@functools.cache
def _cpu_native_bf16() -> bool:
    cpu = getattr(torch, "cpu", None)
    probes = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported",
                                                    "_is_amx_tile_supported")]
    if any(p is not None and p() for p in probes):
        return True
    try:  # Arm: the kernel lists the BF16 extension as "bf16" in Features
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return platform.machine().lower() in ("aarch64", "arm64") and "bf16" in flags


def resolve_dtype(dtype: str) -> DtypeChoice:
    """`auto` -> bfloat16 where the CPU has native bf16 support, else float32."""
    if dtype != "auto":
        return DtypeChoice(dtype, "set by --dtype")
    if native_bf16_supported():
        return DtypeChoice("bfloat16", "--dtype auto: the CPU has native bf16 support")
    return DtypeChoice("float32", "--dtype auto: the CPU has no native bf16 support")


@dataclass(frozen=True)
class EngineConfig:
    """Engine settings (model execution, cache, scheduler, request defaults): one source
    for defaults, the CLI flags (and their aliases) and the docs.

    `seed`, `generation_config` and `chat_template` are applied where the model is
    loaded and requests are built (`swakv.engine.build`, the server, `LLM`); EngineCore
    itself does not read them.
    """

    page_size: int = _help("tokens per KV page in both pools", default=16)
    kv_memory: float = _help(
        "KV cache budget: a size like 4GiB or 512MiB, or a fraction of currently available "
        "RAM like 0.25 (a bare integer below 1 MiB is refused)",
        default=0.25, parse=parse_kv_memory,
    )
    swa_fraction: float | None = _help(
        "share of the KV budget for the SWA pool; default: sized from the cost model "
        "for max_running_requests concurrent windows",
        default=None,
    )
    max_running_requests: int = _help(
        "most requests decoding or prefilling at once", default=64,
        aliases=("--max-num-seqs", "--parallel"))
    chunk_size: int = _help(
        "most prompt tokens prefilled per step (chunked prefill)", default=1024,
        aliases=("--max-num-batched-tokens", "--chunked-prefill-size"))
    max_context: int | None = _help(
        "longest prompt + output in tokens; default: the model's limit", default=None,
        aliases=("--max-model-len", "--context-length"))
    decode_reserve: int = _help(
        "full-pool tokens reserved per running request for future outputs when admitting "
        "(smaller admits more and may retract)",
        default=256,
    )
    frontier_stride: int = _help(
        "advance a request's SWA frontier once this many tokens can be freed (amortised)",
        default=64,
    )
    enable_prefix_cache: bool = _help("share KV between requests with a radix tree", default=True,
                                      aliases=("--enable-prefix-caching",))
    host_kv_memory: str | None = _help(
        "host KV tier (prefix cache only): bytes like 8GiB, or a multiple of the device KV "
        "budget like 4x; evicted prefixes are kept there and loaded back on a hit "
        "(default: off)",
        default=None,
    )
    host_backup_threshold: int = _help(
        "uses (inserts and hits) of a cached prefix before it is copied to the host tier "
        "(1: write-through)",
        default=1,
    )
    dtype: str = _help(
        "model and KV dtype: auto (bfloat16 where the CPU has native bf16 support, else "
        "float32; the choice is logged), bfloat16 (fast) or float32 (the exact reference)",
        default="auto")
    num_threads: int | None = _help("torch CPU threads; default: all cores", default=None,
                                    aliases=("--threads",))
    quantization: str = _help(
        "weight quantization: none (dtype weights; float32 is the exact reference), int8 "
        "(weight-only, groups of 32; with --dtype float32 the closest to the reference), "
        "int4 (weight-only, groups of 32) or w8a8 (int8 weights per channel, int8 "
        "per-token activations for large batches, q/k/v and gate/up inputs smoothed); "
        "quantized modes are NOT exact and pick "
        "the fastest kernel per batch size",
        default="none",
    )
    seed: int | None = _help(
        "seed of the random generator that requests without their own seed sample from "
        "(same seed and same request order: same outputs); default: random", default=None)
    generation_config: str = _help(
        "default temperature / top_k / top_p / min_p / repetition_penalty for requests that "
        "leave them unset: auto (the model's generation_config.json, or its GGUF "
        "general.sampling.* metadata), none (OpenAI's defaults), or a directory or file "
        "holding a generation_config.json", default="auto")
    chat_template: str | None = _help(
        "chat template (jinja) to use instead of the model's: a file, or the template "
        "itself", default=None, aliases=("--chat-template-file",))

    def __post_init__(self) -> None:
        checks = [
            (self.page_size >= 1, "page_size must be >= 1"),
            (0 < self.kv_memory <= 1 or self.kv_memory >= MIB,
             f"kv_memory must be {KV_MEMORY_FORMS}; got {self.kv_memory!r}"),
            (self.swa_fraction is None or 0 < self.swa_fraction < 1, "swa_fraction in (0, 1)"),
            (self.max_running_requests >= 1, "max_running_requests must be >= 1"),
            (self.chunk_size >= 1, "chunk_size must be >= 1"),
            (self.decode_reserve >= 1, "decode_reserve must be >= 1"),
            (self.frontier_stride >= 1, "frontier_stride must be >= 1"),
            (self.host_backup_threshold >= 1, "host_backup_threshold must be >= 1"),
            (self.dtype in DTYPES, "dtype must be one of " + ", ".join(DTYPES)),
            (self.seed is None or 0 <= self.seed < 2**63, "seed must be in [0, 2**63)"),
            (bool(self.generation_config), "generation_config must be auto, none or a path"),
            (self.quantization in QUANTIZATION_MODES,
             "quantization must be one of " + ", ".join(QUANTIZATION_MODES)),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def torch_dtype(self) -> torch.dtype:
        """The dtype `dtype` stands for (`auto` resolved by `resolve_dtype`)."""
        return torch.float32 if resolve_dtype(self.dtype).name == "float32" else torch.bfloat16


@dataclass(frozen=True)
class ServerConfig:
    """HTTP server settings (`swakv serve`); engine settings live in EngineConfig."""

    model: str = _help(
        "model: 'default' (Gemma 3 270M, a base model), a .gguf file or a Hugging "
        "Face-style directory; also accepted as the first argument (swakv serve MODEL)",
        default="default", aliases=("--model-path",),
    )
    served_model_name: str | None = _help(
        "model id clients send and /v1/models lists; default: 'gemma3-270m' for the default "
        "model, else the file or directory name",
        default=None, aliases=("--alias",),
    )
    host: str = _help("address to bind (loopback by default; use 0.0.0.0 to expose)",
                      default="127.0.0.1")
    port: int = _help("TCP port", default=8000)
    api_key: str | None = _help(
        "require 'Authorization: Bearer KEY' on /v1/*, /tokenize and /detokenize (default: "
        "$SWAKV_API_KEY if set, else no auth)",
        default=None,
    )
    max_request_bytes: int = _help("largest request body accepted (larger: 413)",
                                   default=4 << 20)
    max_n: int = _help("most choices (n) per request", default=16)
    drain_timeout: float = _help(
        "seconds to let in-flight requests finish after SIGTERM before exiting", default=300.0
    )
    log_level: str = _help("server log level: debug, info, warning or error", default="info")

    def __post_init__(self) -> None:
        checks = [
            (1 <= self.port <= 65535 or self.port == 0, "port must be in [1, 65535] (0: any)"),
            (self.max_request_bytes >= 1024, "max_request_bytes must be >= 1024"),
            (self.max_n >= 1, "max_n must be >= 1"),
            (self.drain_timeout >= 0, "drain_timeout must be >= 0"),
            (self.log_level in ("debug", "info", "warning", "error"),
             "log_level must be debug, info, warning or error"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
