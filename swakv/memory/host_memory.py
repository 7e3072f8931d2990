"""Host memory for the KV pools: zero tensors that become resident only where written.

A KV budget of several GiB must not cost resident memory before it is used, so the
pools are never written at allocation: `zeroed_tensor` maps them as fresh anonymous
memory, which the OS zero-fills a 4 KiB page at a time on first touch.

Why a plain `mmap` and not `numpy.zeros` (calloc, also lazily committed): numpy
advises transparent huge pages (`MADV_HUGEPAGE`) on arrays of 4 MiB and more, and with
huge pages the pools' first writes got slower, not faster. Measured on this project's
2-core VM (bench/profile_step.py, a 1,024-token prefill chunk, torch profiler, two
alternating runs each): the 36 K/V writes took 40-43 ms with numpy's arrays, 44-46 ms
with `MADV_HUGEPAGE` set explicitly and 7-8 ms with plain 4 KiB pages (chunk 340-357 ms
vs 372-395 ms). Alone (writes of 1,024 rows of 512 B to random 16-slot pages of a
fresh 200 MB pool): 0.15 ms per write with 4 KiB pages, 0.76-1.63 ms with huge pages,
0.06 ms once resident. Scattered pages touch many 2 MiB regions, and each fault there
zeroes 2 MiB for a few KiB written.

Other devices use `torch.zeros`: device memory has no lazy commit to keep.
"""

from __future__ import annotations

import math
import mmap

import torch


def zeroed_tensor(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor of `shape` whose CPU pages become resident only when written.

    CPU: a private anonymous mapping of exactly the tensor's bytes, page-aligned; the
    tensor holds the mapping (unmapped when the last view of it is freed).
    """
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(region, dtype=torch.uint8).view(dtype).view(shape)
