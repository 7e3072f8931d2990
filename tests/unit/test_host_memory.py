"""zeroed_tensor: zeros, writable, and no resident memory until written."""

from __future__ import annotations

import gc
import os

import pytest
import torch

from swakv.memory.host_memory import zeroed_tensor


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_zeros_of_the_shape_and_writable(dtype: torch.dtype) -> None:
    t = zeroed_tensor((1000, 2, 64), dtype, torch.device("cpu"))
    assert t.shape == (1000, 2, 64) and t.dtype == dtype and t.is_contiguous()
    assert t.data_ptr() % 4096 == 0
    assert not t.any()
    t[[3, 997]] = 1.5
    assert t.sum().item() == 2 * 2 * 64 * 1.5
    assert (t[:3] == 0).all() and (t[4:997] == 0).all()


def test_views_keep_the_mapping_alive() -> None:
    view = zeroed_tensor((4096, 256), torch.bfloat16, torch.device("cpu"))[100:200]
    gc.collect()
    view.fill_(2.0)
    assert view.float().sum().item() == 100 * 256 * 2.0


def test_empty_shape() -> None:
    assert zeroed_tensor((0, 1, 8), torch.bfloat16, torch.device("cpu")).numel() == 0


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_untouched_pages_are_not_resident() -> None:
    before = _rss_bytes()
    t = zeroed_tensor((1 << 20, 1, 512), torch.bfloat16, torch.device("cpu"))  # 1 GiB
    allocated = _rss_bytes()
    assert allocated - before < 16 << 20
    rows = torch.arange(0, 1 << 20, 1 << 14)  # 64 rows, 1 KiB each, 16 MiB apart
    t[rows] = 1.0
    # 4 KiB pages: 64 pages made resident, not 64 huge pages (128 MiB)
    assert _rss_bytes() - allocated < 16 << 20
    assert t[rows].all() and t.view(-1)[: 1 << 14].sum() == 512
