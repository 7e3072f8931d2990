"""Sampler: greedy, filters' exact support sets, seeded reproducibility, penalties."""

from __future__ import annotations

import math

import pytest
import torch

from swakv.model.sampler import Sampler, apply_penalties, filtered_probs, make_generator
from swakv.sampling_params import SamplingParams

NEG = float("-inf")


def _sample(logits: torch.Tensor, params: list[SamplingParams], outputs=None, prompts=None):
    gens = [make_generator(p) for p in params]
    prompts = prompts or [[] for _ in params]
    outputs = outputs or [[] for _ in params]
    return Sampler().sample(logits, params, gens, prompts, outputs)


def _support(logits: list[float], **kw) -> set[int]:
    probs = filtered_probs(torch.tensor([logits]), [SamplingParams(**kw)])[0]
    return set(torch.nonzero(probs > 0).flatten().tolist())


def test_greedy_is_argmax() -> None:
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, top_k=1)] * 2
    params.append(SamplingParams(temperature=0.0, seed=3))
    res = _sample(logits, params)
    assert res.token_ids.tolist() == logits.argmax(-1).tolist()
    assert res.logprobs == [None] * 5


def test_top_k_support() -> None:
    logits = [0.0, 3.0, 1.0, 2.0, -1.0, 2.5]
    assert _support(logits, top_k=2) == {1, 5}
    assert _support(logits, top_k=3) == {1, 5, 3}
    assert _support(logits, top_k=0) == set(range(6))
    assert _support([1.0, 1.0, 0.0], top_k=1, temperature=1.0) == {0, 1}  # ties kept (HF)


def test_top_p_support() -> None:
    # probabilities 0.5, 0.25, 0.125, 0.125 (descending order 0, 1, 2|3)
    logits = [math.log(0.5), math.log(0.25), math.log(0.125), math.log(0.125)]
    assert _support(logits, top_p=0.5) == {0}
    assert _support(logits, top_p=0.6) == {0, 1}
    assert _support(logits, top_p=0.75) == {0, 1}
    assert _support(logits, top_p=0.76) == {0, 1, 2} or _support(logits, top_p=0.76) == {0, 1, 3}
    assert _support(logits, top_p=0.01) == {0}  # never empty


def test_top_p_after_top_k_is_renormalised() -> None:
    # top_k=2 leaves 0.5 / 0.25 -> renormalised 2/3, 1/3: top_p 0.6 keeps only token 0
    logits = [math.log(0.5), math.log(0.25), math.log(0.125), math.log(0.125)]
    assert _support(logits, top_k=2, top_p=0.6) == {0}
    assert _support(logits, top_k=2, top_p=0.7) == {0, 1}


def test_min_p_support() -> None:
    # probabilities 0.4, 0.3, 0.2, 0.1: min_p 0.5 -> threshold 0.2 keeps 0, 1, 2
    logits = [math.log(0.4), math.log(0.3), math.log(0.2), math.log(0.1)]
    assert _support(logits, min_p=0.5) == {0, 1, 2}
    assert _support(logits, min_p=0.76) == {0}
    assert _support(logits, min_p=0.74) == {0, 1}


def test_temperature_scales_distribution() -> None:
    logits = torch.tensor([[1.0, 2.0, 0.5]])
    probs = filtered_probs(logits, [SamplingParams(temperature=0.5)])
    torch.testing.assert_close(probs, torch.softmax(logits / 0.5, -1))


def test_seeded_sampling_ignores_batch_composition() -> None:
    g = torch.Generator().manual_seed(1)
    target = torch.randn(1, 40, generator=g)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234)
    alone = int(_sample(target, [seeded]).token_ids[0])
    others = torch.randn(3, 40, generator=g)
    mixed = torch.cat([others[:2], target, others[2:]])
    params = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.0), seeded,
              SamplingParams(temperature=0.8, seed=7)]
    assert int(_sample(mixed, params).token_ids[2]) == alone

    # a whole sequence of steps with one generator per request, batched or alone
    def run(batch_extra: int) -> list[int]:
        gens = [make_generator(seeded)] + [None] * batch_extra
        out = []
        for step in range(20):
            logits = torch.cat([target + step * 0.1, torch.randn(batch_extra, 40)])
            ps = [seeded] + [SamplingParams(temperature=1.0)] * batch_extra
            res = Sampler().sample(logits, ps, gens, [[]] * len(ps), [[]] * len(ps))
            out.append(int(res.token_ids[0]))
        return out

    assert run(0) == run(5)


def test_repetition_penalty_hf_semantics() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0, 4.0]])
    params = [SamplingParams(repetition_penalty=2.0)]
    out = apply_penalties(logits, params, [[0, 1]], [[1, 2]])
    assert out.tolist() == [[1.0, -4.0, 0.5, -1.0, 4.0]]


def test_frequency_and_presence_penalties_openai_semantics() -> None:
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    params = [SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)]
    # prompt tokens never count; output has token 1 three times and token 2 once
    out = apply_penalties(logits, params, [[3, 3, 3]], [[1, 1, 2, 1]])
    expected = [1.0, 1.0 - 3 * 0.5 - 0.25, 1.0 - 0.5 - 0.25, 1.0]
    torch.testing.assert_close(out, torch.tensor([expected]))


def test_penalties_change_greedy_choice_and_leave_others_alone() -> None:
    logits = torch.tensor([[3.0, 2.9, 0.0], [3.0, 2.9, 0.0]])
    params = [SamplingParams(temperature=0.0, presence_penalty=0.5), SamplingParams(temperature=0.0)]
    before = logits.clone()
    res = _sample(logits, params, outputs=[[0], [0]])
    assert res.token_ids.tolist() == [1, 0]
    assert torch.equal(logits, before)  # input untouched


def test_logprobs_raw_distribution() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0], [1.0, 1.0, 1.0, 1.0]])
    params = [SamplingParams(temperature=0.0, logprobs=2), SamplingParams(temperature=0.0)]
    res = _sample(logits, params)
    lp = torch.log_softmax(logits[0], -1)
    entry = res.logprobs[0]
    assert entry is not None and res.logprobs[1] is None
    assert entry.token_id == 3 and entry.top_ids == (3, 2)
    assert entry.logprob == pytest.approx(lp[3].item())
    assert entry.top_logprobs == pytest.approx((lp[3].item(), lp[2].item()))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_empirical_distribution_matches_softmax(temperature: float) -> None:
    logits = torch.tensor([1.0, 0.0, 2.0, -1.0, 0.5])
    n = 4000
    gen = torch.Generator().manual_seed(99)
    counts = torch.zeros(5)
    batch = logits.expand(200, 5)
    for _ in range(n // 200):  # 200 rows per call sharing one generator: 200 draws
        res = Sampler().sample(batch, [SamplingParams(temperature=temperature)] * 200,
                               [gen] * 200, [[]] * 200, [[]] * 200)
        counts += torch.bincount(res.token_ids, minlength=5).float()
    expected = torch.softmax(logits / temperature, -1)
    assert (counts / n - expected).abs().max().item() < 0.03


def test_sampling_never_picks_filtered_tokens() -> None:
    logits = torch.tensor([[5.0, 4.0, NEG, 3.0, -10.0]]).expand(64, 5).contiguous()
    params = [SamplingParams(temperature=1.5, top_k=3, seed=s) for s in range(64)]
    res = _sample(logits, params)
    assert set(res.token_ids.tolist()) <= {0, 1, 3}


def test_greedy_ids_two_stage_equals_argmax_with_ties():
    from swakv.model.sampler import GREEDY_BLOCK, greedy_ids

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(9, 8 * GREEDY_BLOCK, generator=g).to(dtype)
        x[1, 5] = x[1, 3 * GREEDY_BLOCK + 7] = 100.0  # tie across blocks: the first wins
        x[2, 4 * GREEDY_BLOCK + 2] = x[2, 4 * GREEDY_BLOCK + 9] = 50.0  # tie in a block
        x[3] = 0.0  # all equal: index 0
        assert greedy_ids(x).tolist() == x.float().argmax(dim=-1).tolist()
        assert greedy_ids(x)[1] == 5 and greedy_ids(x)[2] == 4 * GREEDY_BLOCK + 2
