"""The host tier in the engine: a prompt whose prefix was demoted to the host and loaded
back gives the same greedy tokens as a cold run and as a device hit (tiny model, and
the real Gemma 3 270M in fp32), with the hit served from the host."""

from __future__ import annotations

import pytest

from swakv.cache import HiCache
from swakv.config import EngineConfig
from swakv.engine.build import build_engine
from swakv.sampling_params import SamplingParams


def three_ways(eng, prompt: list[int], max_tokens: int) -> dict:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)

    def run():
        req = eng.add_request(prompt, params)
        while not req.is_finished:
            eng.step()
            eng.check_integrity()
        return req

    cold = run()
    device = run()
    host_hits = eng.snapshot().counters["host_hit_tokens"]
    eng.flush_cache()  # every cached node is backed up: all demoted to the host
    eng.check_integrity()
    assert eng.cache.stats().cached.full == 0
    host_total, host_free = eng.cache.host_usage()
    assert host_free.full < host_total.full  # the prefix lives on the host now
    loaded = run()
    snap = eng.snapshot()
    return {"cold": cold, "device": device, "loaded": loaded,
            "host_hit": snap.counters["host_hit_tokens"] - host_hits,
            "loaded_swa": snap.counters["loaded_swa_tokens"]}


def test_demoted_prefix_loads_back_exactly_tiny(tmp_path):
    from swakv.model.testing import make_tiny_gemma3_dir

    d = make_tiny_gemma3_dir(tmp_path / "tiny", num_layers=4, window=8, vocab=128)
    cfg = EngineConfig(page_size=4, kv_memory=4 << 20, host_kv_memory="4x", chunk_size=16)
    eng = build_engine(str(d), cfg)
    assert isinstance(eng.cache, HiCache)
    prompt = [3 + (7 * i) % 120 for i in range(61)]
    r = three_ways(eng, prompt, 12)
    assert r["cold"].output_ids == r["device"].output_ids == r["loaded"].output_ids
    assert r["device"].cached_prompt_tokens == 60
    assert r["loaded"].cached_prompt_tokens == 60 and r["host_hit"] == 60
    assert r["loaded_swa"] == 60 - (60 - 7) // 4 * 4  # only the window's pages


@pytest.mark.slow
def test_demoted_prefix_loads_back_exactly_real_fp32():
    cfg = EngineConfig(dtype="float32", kv_memory=256 << 20, host_kv_memory="2x",
                       chunk_size=512, max_running_requests=4)
    eng = build_engine(None, cfg)
    prompt = [2] + [1000 + (37 * i) % 50_000 for i in range(900)]  # longer than W = 512
    r = three_ways(eng, prompt, 16)
    assert r["cold"].output_ids == r["device"].output_ids == r["loaded"].output_ids
    hit = len(prompt) - 1 - (len(prompt) - 1) % 16
    assert r["loaded"].cached_prompt_tokens == hit and r["host_hit"] == hit
    assert r["loaded_swa"] == hit - (hit - 511) // 16 * 16  # one window, not the prefix
