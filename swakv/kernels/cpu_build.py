"""Build the C++ CPU kernels (attention, grouped int8 matmul) once and load them as
`torch.ops.swakv.*`.

The shared library is compiled with the system C++ compiler (`$CXX`, default `c++`;
no ninja or pybind needed) into `~/.cache/swakv/kernels/<key>/` (override the root
with `$SWAKV_KERNEL_CACHE`), where `<key>` hashes the source, the compiler flags, the
torch version and the CPU's feature flags (the code is built with -march=native). A
build takes ~15 s once; later processes only load the file. Concurrent builders
each compile to a private temporary file and rename it into place atomically.

`cpu_kernels_available()` never raises: without a compiler, or when the build or the
load fails, it logs one warning and returns False, and attention runs the pure
torch path. `SWAKV_DISABLE_KERNELS=1` forces that path.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from swakv.kernels.paged_attention_src import SOURCE

log = logging.getLogger("swakv.kernels")

LIB_NAME = "swakv_attention.so"
CXX_FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c++17", "-DNDEBUG",
             "-fno-math-errno", "-w")
BUILD_TIMEOUT_S = 300


class KernelBuildError(RuntimeError):
    """The C++ kernels could not be compiled or loaded."""


def cache_root() -> Path:
    env = os.environ.get("SWAKV_KERNEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "swakv" / "kernels"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compile_args() -> tuple[list[str], list[str]]:
    from torch.utils import cpp_extension

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    includes.append(f"-I{_python_include()}")
    libs = cpp_extension.library_paths()
    link = [f"-L{p}" for p in libs] + [f"-Wl,-rpath,{p}" for p in libs]
    link += ["-lc10", "-ltorch_cpu", "-ltorch"]
    return [*CXX_FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *includes], link


def _python_include() -> str:
    import sysconfig

    return sysconfig.get_paths()["include"]


def build_key(compiler: str) -> str:
    cflags, link = _compile_args()
    parts = [SOURCE, compiler, " ".join(cflags + link), torch.__version__, sys.version, _cpu_flags()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def build(root: Path | None = None) -> Path:
    """Path of the compiled library, compiling it first if the cache lacks it."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise KernelBuildError(f"no C++ compiler ({compiler!r} not found)")
    out_dir = (root or cache_root()) / build_key(compiler)
    lib = out_dir / LIB_NAME
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    src = out_dir / "paged_attention.cpp"
    src.write_text(SOURCE)
    cflags, link = _compile_args()
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".so.tmp")
    os.close(fd)
    cmd = [compiler, *cflags, str(src), "-o", tmp, *link]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if proc.returncode != 0:
            raise KernelBuildError(f"compiler failed: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


@functools.cache
def cpu_kernels_available() -> bool:
    """Load (building if needed) the kernels once per process; False on any failure."""
    if os.environ.get("SWAKV_DISABLE_KERNELS") == "1":
        return False
    if hasattr(torch.ops.swakv, "paged_decode"):  # already loaded in this process
        return True
    return try_load(build)


def try_load(builder: Callable[[], Path]) -> bool:
    """Load the library `builder` returns; on failure log one warning and return False."""
    try:
        torch.ops.load_library(str(builder()))
    except (KernelBuildError, OSError, RuntimeError, subprocess.SubprocessError) as e:
        text = str(e).strip()
        first = text.splitlines()[0] if text else type(e).__name__
        log.warning("swakv: C++ attention kernels unavailable, using the torch path (%s)", first)
        return False
    return True
