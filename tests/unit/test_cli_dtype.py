"""`--dtype auto` (the default): bf16 where the CPU computes bf16 natively, else float32;
the engine runs the resolved dtype and start-up logs the choice."""

from __future__ import annotations

import logging
import platform
from pathlib import Path

import pytest
import torch

import swakv.config
from swakv.config import EngineConfig, native_bf16_supported, resolve_dtype
from swakv.engine.build import build
from swakv.sched.sizing import PoolSizes


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from swakv.model.testing import make_tiny_gemma3_dir

    path = tmp_path_factory.mktemp("tiny_dtype")
    make_tiny_gemma3_dir(path, num_layers=3, window=8, vocab=128, seed=1)
    return str(path)


def expected_native_bf16() -> bool:
    """From the kernel's CPU flags: x86 AVX512-BF16 or AMX-BF16; Arm BF16."""
    flags = set(Path("/proc/cpuinfo").read_text().split())
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "bf16" in flags
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def test_auto_is_the_default():
    assert EngineConfig().dtype == "auto"


def test_probe_matches_the_cpu_flags():
    """The probe says yes exactly when the kernel lists native bf16 (this machine has
    avx512_bf16, so auto picks bf16 here)."""
    native = expected_native_bf16()
    assert native_bf16_supported() == native
    expected = "bfloat16" if native else "float32"
    assert resolve_dtype("auto").name == expected
    assert EngineConfig().torch_dtype == getattr(torch, expected)


@pytest.mark.parametrize("native,expected", [(True, "bfloat16"), (False, "float32")])
def test_engine_runs_and_logs_the_resolved_dtype(tiny_dir, monkeypatch, caplog, native,
                                                 expected):
    monkeypatch.setattr(swakv.config, "native_bf16_supported", lambda: native)
    with caplog.at_level(logging.INFO, logger="swakv.engine"):
        built = build(tiny_dir, EngineConfig(page_size=4), sizes=PoolSizes(32, 32, 4, 0, 0))
    assert built.engine.cfg.dtype == expected
    assert built.engine.kv_pool.layout.dtype == getattr(torch, expected)
    support = "has" if native else "has no"
    assert f"dtype {expected} (--dtype auto: the CPU {support} native bf16 support)" \
        in caplog.messages


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_explicit_dtype_is_kept_whatever_the_probe_says(monkeypatch, dtype):
    monkeypatch.setattr(swakv.config, "native_bf16_supported", lambda: dtype == "float32")
    assert resolve_dtype(dtype).name == dtype
    assert EngineConfig(dtype=dtype).torch_dtype == getattr(torch, dtype)


def test_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="dtype must be one of auto, float32, bfloat16"):
        EngineConfig(dtype="float16")
