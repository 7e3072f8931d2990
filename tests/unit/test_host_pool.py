"""HostKVPool (layout, exact page ids, atomic alloc/free) and host pool sizing."""

from __future__ import annotations

import pytest
import torch

from swakv.config import AttentionSpec, AttnKind, KVLayout
from swakv.memory.allocator import InvalidFree
from swakv.memory.host_pool import (
    HostKVMemory,
    HostKVPool,
    HostPoolSizes,
    HostPoolTooSmall,
    InvalidHostKVMemory,
    OutOfHostKVMemory,
    host_pool_sizes,
    parse_host_kv_memory,
)
from swakv.memory.pages import Need
from swakv.sched.sizing import PoolSizes

# 3 layers: sliding, sliding, full; sliding layers have their own head count / dim
SW = AttentionSpec(AttnKind.SLIDING, 1, 4, 10_000.0, window=6)
FULL = AttentionSpec(AttnKind.FULL, 2, 8, 1_000_000.0)
LAYOUT = KVLayout(layers=(SW, SW, FULL))
BF = 2 * 2 * 8 * 4  # full bytes per token: K+V, 2 heads x 8, float32, one layer = 128
BS = 2 * 2 * 1 * 4 * 4  # SWA bytes per token: two layers of K+V, 1 head x 4 = 64


def device_sizes(full_pages: int = 10, swa_pages: int = 5, page: int = 4) -> PoolSizes:
    return PoolSizes(full_pages, swa_pages, page, (full_pages + 1) * page * BF,
                     (swa_pages + 1) * page * BS)


def make_pool(full_pages: int = 6, swa_pages: int = 4, page: int = 4,
              dtype: torch.dtype = torch.float32) -> HostKVPool:
    layout = KVLayout(layers=LAYOUT.layers, dtype=dtype)
    return HostKVPool(layout, HostPoolSizes(full_pages, swa_pages, page, 0, 0))


def snapshot(pool: HostKVPool) -> tuple:
    return (pool.full.free_pages().tolist(), pool.full.is_free_mask().tolist(),
            pool.swa.free_pages().tolist(), pool.swa.is_free_mask().tolist(), pool.available())


# ---- parsing and sizing --------------------------------------------------------------

@pytest.mark.parametrize("setting, expected", [
    ("4x", HostKVMemory(multiple=4.0)),
    ("2.5X", HostKVMemory(multiple=2.5)),
    (" 0.5 x ", HostKVMemory(multiple=0.5)),
    ("8GiB", HostKVMemory(num_bytes=8 << 30)),
    ("512MiB", HostKVMemory(num_bytes=512 << 20)),
    ("512M", HostKVMemory(num_bytes=512_000_000)),
    ("3kib", HostKVMemory(num_bytes=3072)),
    ("1.5e9", HostKVMemory(num_bytes=1_500_000_000)),
    ("1000000", HostKVMemory(num_bytes=1_000_000)),
    (1_000_000, HostKVMemory(num_bytes=1_000_000)),
    (2e9, HostKVMemory(num_bytes=2_000_000_000)),
    (None, None), ("off", None), ("None", None), ("", None), ("0", None), (0, None),
])
def test_parse_host_kv_memory(setting, expected) -> None:
    assert parse_host_kv_memory(setting) == expected


@pytest.mark.parametrize("setting", [
    "abc", "-1", "0x", "-2x", "4y", "x", "4xx", "1e-3", "GiB", -5, 0.5, float("nan"),
    float("inf"), True, [4],
])
def test_parse_host_kv_memory_rejects(setting) -> None:
    with pytest.raises(InvalidHostKVMemory):
        parse_host_kv_memory(setting)


def test_host_kv_memory_budget_bytes() -> None:
    assert HostKVMemory(multiple=2.5).budget_bytes(1000) == 2500
    assert HostKVMemory(num_bytes=77).budget_bytes(1000) == 77


def test_host_pool_sizes_mirror_the_device_ratio() -> None:
    dev = device_sizes()  # 10 full, 5 SWA pages of 4; 5632 + 1536 = 7168 bytes
    assert (dev.full_bytes, dev.swa_bytes) == (5632, 1536)
    # 1x of the device pools' own bytes reproduces them exactly
    assert host_pool_sizes(LAYOUT, dev, "1x") == HostPoolSizes(10, 5, 4, 5632, 1536)
    # 4x: usable = 28672 - 4 * (128 + 64) = 27904; per unit 4 * (10*128 + 5*64) = 6400
    # full 27904 * 10 // 6400 = 43, SWA 27904 * 5 // 6400 = 21
    s = host_pool_sizes(LAYOUT, dev, "4x")
    assert s == HostPoolSizes(43, 21, 4, 44 * 4 * BF, 22 * 4 * BS)
    assert s.full_bytes + s.swa_bytes <= 4 * 7168
    assert (s.full_tokens, s.swa_tokens) == (172, 84)
    # bytes: 16 KiB -> usable 15616 -> 24 full, 12 SWA pages
    assert host_pool_sizes(LAYOUT, dev, "16KiB") == HostPoolSizes(24, 12, 4, 25 * 4 * BF, 13 * 4 * BS)
    assert host_pool_sizes(LAYOUT, dev, 16384) == host_pool_sizes(LAYOUT, dev, "16KiB")
    assert host_pool_sizes(LAYOUT, dev, HostKVMemory(num_bytes=16384)).num_full_pages == 24
    # a multiple of an explicit device budget: 2 * 10000 -> usable 19232 -> 30, 15
    s2 = host_pool_sizes(LAYOUT, dev, "2x", device_budget_bytes=10_000)
    assert (s2.num_full_pages, s2.num_swa_pages) == (30, 15)
    assert host_pool_sizes(LAYOUT, dev, None) is None
    assert host_pool_sizes(LAYOUT, dev, "off") is None


def test_host_pool_sizes_too_small_and_bad_values() -> None:
    dev = device_sizes()
    with pytest.raises(HostPoolTooSmall, match="holds no page"):
        host_pool_sizes(LAYOUT, dev, 100)  # below the two padding pages (768 bytes)
    with pytest.raises(HostPoolTooSmall, match="0 full and 0 SWA"):
        host_pool_sizes(LAYOUT, dev, 1000)  # usable 232: not one unit of 640 bytes
    with pytest.raises(InvalidHostKVMemory, match="4y"):
        host_pool_sizes(LAYOUT, dev, "4y")


def test_host_pool_sizes_without_sliding_layers() -> None:
    layout = KVLayout(layers=(FULL, FULL))
    dev = PoolSizes(8, 0, 2, 9 * 2 * 2 * BF, 0)
    s = host_pool_sizes(layout, dev, "3x")
    # usable = 3 * 9 * 512 - 2 * 256 = 13312; per unit 2 * 8 * 256 = 4096 -> 26 full pages
    assert s == HostPoolSizes(26, 0, 2, 27 * 2 * 2 * BF, 0)
    pool = HostKVPool(layout, s)
    assert pool.swa_k == [] and pool.num_swa_pages == 0
    assert pool.alloc(2, 0).full_pages.tolist() == [1, 2]
    pool.check_integrity()


# ---- pool layout -----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layout_mirrors_device_pools(dtype: torch.dtype) -> None:
    pool = make_pool(6, 4, 4, dtype)
    assert pool.layer_is_swa == (True, True, False)
    assert pool.layer_index == (0, 1, 0)
    assert (pool.num_full_slots, pool.num_swa_slots) == (28, 20)
    for layer in range(3):
        k, v = pool.buffers(layer)
        heads_dim = (2, 8) if layer == 2 else (1, 4)
        slots = 28 if layer == 2 else 20
        assert k.shape == v.shape == (slots, *heads_dim)
        assert k.dtype == v.dtype == dtype
        assert k.device.type == "cpu" and not k.is_pinned()
        assert not bool(k[:4].any()) and not bool(v[:4].any())  # padding page zeroed
    assert pool.buffers(1)[1] is pool.swa_v[1] and pool.buffers(2)[0] is pool.full_k[0]
    elem = 4 if dtype == torch.float32 else 2
    assert pool.nbytes() == (28 * BF * elem // 4, 20 * BS * elem // 4)
    assert not pool.pinned
    assert pool.total() == Need(24, 16) == pool.available()
    assert pool.available_pages() == Need(6, 4)
    pool.check_integrity()


def test_nbytes_equal_sized_bytes() -> None:
    s = host_pool_sizes(LAYOUT, device_sizes(), "4x")
    assert HostKVPool(LAYOUT, s).nbytes() == (s.full_bytes, s.swa_bytes)


# ---- alloc / free ----------------------------------------------------------------------

def test_exact_page_ids_and_fifo_reuse() -> None:
    pool = make_pool(6, 4)
    a = pool.alloc(3, 2)
    assert a.full_pages.tolist() == [1, 2, 3] and a.swa_pages.tolist() == [1, 2]
    assert a.full_pages.dtype == torch.int64 and a.swa_pages.dtype == torch.int64
    pool.check_integrity()
    b = pool.alloc(2, 0)
    assert b.full_pages.tolist() == [4, 5] and b.swa_pages.tolist() == []
    assert pool.available() == Need(4, 8) and pool.available_pages() == Need(1, 2)
    pool.check_integrity()
    pool.free(torch.tensor([2, 1]), torch.tensor([2]))
    assert pool.full.free_pages().tolist() == [6, 2, 1]
    assert pool.swa.free_pages().tolist() == [3, 4, 2]
    pool.check_integrity()
    c = pool.alloc(2, 3)  # freed pages come back after the never-used ones
    assert c.full_pages.tolist() == [6, 2] and c.swa_pages.tolist() == [3, 4, 2]
    assert pool.available_pages() == Need(1, 0)
    pool.check_integrity()
    pool.free([3, 4, 5, 6, 2], [1, 3, 4, 2])  # lists and arrays are accepted too
    pool.free(torch.tensor([], dtype=torch.int64), torch.tensor([], dtype=torch.int64))
    assert pool.available_pages() == Need(6, 4)
    pool.check_integrity()


@pytest.mark.parametrize("full, swa", [(7, 0), (0, 5), (7, 5), (6, 5), (7, 4)])
def test_failed_alloc_takes_nothing(full: int, swa: int) -> None:
    pool = make_pool(6, 4)
    assert not pool.can_alloc(full, swa)
    before = snapshot(pool)
    with pytest.raises(OutOfHostKVMemory) as e:
        pool.alloc(full, swa)
    assert e.value.need_pages == Need(full, swa)
    assert e.value.available_pages == Need(6, 4)
    assert snapshot(pool) == before
    pool.check_integrity()
    assert pool.can_alloc(6, 4)
    assert pool.alloc(6, 4).full_pages.tolist() == [1, 2, 3, 4, 5, 6]


def test_failed_alloc_after_partial_use() -> None:
    pool = make_pool(6, 4)
    pool.alloc(2, 3)
    before = snapshot(pool)
    with pytest.raises(OutOfHostKVMemory) as e:
        pool.alloc(1, 2)  # full fits, SWA does not: full must not be taken
    assert e.value.available_pages == Need(4, 1)
    assert snapshot(pool) == before
    pool.check_integrity()


@pytest.mark.parametrize("sizes", [(-1, 2, 4), (2, -1, 4), (2, 2, 0)])
def test_bad_sizes_raise(sizes) -> None:
    with pytest.raises(ValueError, match="bad host pool sizes"):
        HostPoolSizes(*sizes, 0, 0)


def test_negative_counts_raise() -> None:
    pool = make_pool()
    with pytest.raises(ValueError):
        pool.alloc(-1, 0)
    assert pool.available_pages() == Need(6, 4)


@pytest.mark.parametrize("full, swa, match", [
    ([1, 1], [], "repeated"),  # repeat within one call
    ([1], [2, 2], "repeated"),
    ([3], [], "already free"),  # never allocated
    ([1], [3], "already free"),  # full fine, SWA not allocated: nothing may change
    ([0], [], "out of range"),  # padding page
    ([1], [5], "out of range"),
    ([7], [1], "out of range"),
])
def test_invalid_free_changes_nothing(full, swa, match: str) -> None:
    pool = make_pool(6, 4)
    pool.alloc(2, 2)
    before = snapshot(pool)
    with pytest.raises(InvalidFree, match=match):
        pool.free(torch.tensor(full, dtype=torch.int64), torch.tensor(swa, dtype=torch.int64))
    assert snapshot(pool) == before
    pool.check_integrity()


def test_double_free_raises() -> None:
    pool = make_pool(6, 4)
    got = pool.alloc(2, 1)
    pool.free(got.full_pages, got.swa_pages)
    before = snapshot(pool)
    with pytest.raises(InvalidFree):
        pool.free(got.full_pages, torch.tensor([], dtype=torch.int64))
    with pytest.raises(InvalidFree):
        pool.free(torch.tensor([], dtype=torch.int64), got.swa_pages)
    assert snapshot(pool) == before
    pool.check_integrity()


def test_layer_views_do_not_overlap() -> None:
    pool = make_pool(5, 3, 2)
    all_tensors = pool.full_k + pool.full_v + pool.swa_k + pool.swa_v
    assert len(all_tensors) == 6
    for i, t in enumerate(all_tensors):
        assert t.is_contiguous()
        t.fill_(float(i))
    for i, t in enumerate(all_tensors):
        assert bool((t == float(i)).all()), f"tensor {i} overwritten by another"
