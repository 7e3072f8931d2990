"""The engine on the real Gemma 3 270M (fp32): batched greedy == each prompt alone."""

from __future__ import annotations

import random

import pytest

from swakv.config import EngineConfig
from swakv.engine.build import build_engine
from swakv.sampling_params import SamplingParams

pytestmark = pytest.mark.slow


def test_batch_of_16_equals_alone_real_model():
    cfg = EngineConfig(page_size=16, kv_memory=1 << 30, chunk_size=512, dtype="float32")
    eng = build_engine(None, cfg)
    rng = random.Random(0)
    window = eng.spec.window
    lengths = [5, 40, 130, 300, window - 1, window, window + 1, 700, 900, 1100,
               20, 64, 257, 600, 1300, 2 * window + 17]
    prompts = [[eng.spec.bos_token_id] + [rng.randrange(100, 20000) for _ in range(n - 1)]
               for n in lengths]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)

    def run(batch):
        reqs = [eng.add_request(p, params) for p in batch]
        while any(not r.is_finished for r in reqs):
            eng.step()
        eng.check_integrity()
        return [r.output_ids for r in reqs]

    together = run(prompts)
    eng.flush_cache()
    alone = [run([p])[0] for p in prompts]
    assert together == alone
    eng.flush_cache()
    assert eng.allocator.available() == eng.allocator.total()
