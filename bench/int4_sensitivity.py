"""What int4 costs per linear role, and whether calibrated rounding (GPTQ) recovers it.

float32 activations, so only the weights differ from the reference. Each variant
replaces some linears' weights by their int4 effective weights (groups of 32, what
`--quantization int4` runs) and keeps the rest exact, then scores the 32 prompts of
bench/quant_quality.py (64 tokens teacher-forced on the float32 greedy continuation):

    rtn:ROLES   swakv's int4 (`Int4Weights.quantize`) on ROLES ("all", or parts joined
                by "+": a role (qkv, o, gate_up, down, lm_head), "layers" (every
                linear but the LM head) or "layerN" (every linear of layer N)), the
                rest exact
    rtn/gN:ROLES  the same with groups of N input columns instead of 32 (int4 plus
                a bf16 scale and zero per group: 4 + 32 / N bits per weight)
    gptq:ROLES  GPTQ (Frantar et al. 2022: columns rounded in order, each one's error
                spread over the columns not yet rounded through the inverse Hessian
                of the layer's inputs) on the same int4 groups; Hessians from
                float32 forwards over calibration text that is not in the scored
                prompts (the source of Python standard-library modules), the first
                position of each sequence weighted like all the others together
                (Gemma's first position has outsized activations; unweighted GPTQ
                made top-1 worse than rtn)

    flock /tmp/swakv-cpu.lock .venv/bin/python bench/int4_sensitivity.py \
        --variants rtn:all,gptq:all,rtn:qkv,gptq:qkv

Whether a few layers carry the cost (int4 on one layer at a time) and what smaller
groups buy:

    flock /tmp/swakv-cpu.lock .venv/bin/python bench/int4_sensitivity.py \
        --variants rtn:layers,$(seq -s, -f rtn:layer%g 0 17),rtn/g16:all,rtn/g8:all
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import time
from pathlib import Path

import torch
from quant_quality import Scorer, load_with_prompts, score

from swakv.model.gemma3 import Gemma3Model
from swakv.model.quant import LINEAR_ROLES, DenseKernel, role_of
from swakv.model.quant_formats import INT4_GROUP_SIZE, Int4Weights, quantize_int4_groups
from swakv.model.tokenizer import Tokenizer

CALIBRATION_MODULES = (
    "argparse", "collections", "json", "email.message", "http.server", "typing", "logging",
    "subprocess", "unittest", "pathlib", "dataclasses", "functools", "textwrap", "datetime",
    "decimal", "fractions", "statistics", "random", "heapq", "zipfile", "tarfile", "csv",
    "string", "inspect", "threading", "socket", "urllib.parse",
)


def calibration_sequences(tok: Tokenizer, bos: int, num: int, length: int) -> list[list[int]]:
    text = "\n\n".join(inspect.getsource(importlib.import_module(m)) for m in CALIBRATION_MODULES)
    ids = tok.encode(text, add_bos=False)
    step = len(ids) // num
    return [[bos] + ids[i * step : i * step + length - 1] for i in range(num)]


class _Recorder:
    """Wraps a linear and adds its inputs' x^T x (float64) to `hessians[name]`."""

    def __init__(self, linear, name: str, hessians: dict, first_weight: float) -> None:
        self.linear, self.name, self.hessians, self.first_weight = linear, name, hessians, first_weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).double().clone()
        rows[0] *= self.first_weight**0.5  # each call is one sequence; row 0 is its BOS
        self.hessians[self.name] = self.hessians.get(self.name, 0) + rows.T @ rows
        return self.linear(x)

    def into(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out.copy_(self(x))


def selected(name: str, selection: str) -> bool:
    """Whether the linear `name` ("lm_head" / "layers.{i}.{role}") is in `selection`
    (see the module docstring's ROLES)."""
    if selection == "all":
        return True
    layer = None if name == "lm_head" else name.split(".")[1]
    for part in selection.split("+"):
        if part == role_of(name) or (part == "layers" and layer is not None):
            return True
        if part.startswith("layer") and part != "layers" and part[5:] == layer:
            return True
    return False


def parse_variant(variant: str) -> tuple[str, int, str]:
    """"rtn/g16:qkv" -> ("rtn", 16, "qkv"); the group is INT4_GROUP_SIZE by default."""
    method, selection = variant.split(":")
    method, _, group = method.partition("/g")
    parts = [] if selection == "all" else selection.split("+")
    known = set(LINEAR_ROLES) | {"layers"}
    if (method not in ("rtn", "gptq") or (group and method != "rtn")
            or any(p not in known and not (p.startswith("layer") and p[5:].isdigit())
                   for p in parts)):
        # a misspelt part would select nothing and score as the exact model
        raise SystemExit(f"unknown variant {variant!r}: rtn[/gN]:ROLES or gptq:ROLES")
    return method, int(group) if group else INT4_GROUP_SIZE, selection


def set_linear(model: Gemma3Model, name: str, linear) -> None:
    model.linears[name] = linear
    if name == "lm_head":
        model.lm_head = linear
        return
    layer, role = name.split(".")[1:]
    object.__setattr__(model.layers[int(layer)], role, linear)


def collect_hessians(model: Gemma3Model, seqs: list[list[int]]) -> dict[str, torch.Tensor]:
    hessians: dict[str, torch.Tensor] = {}
    originals = dict(model.linears)
    first_weight = float(len(seqs[0]) - 1)
    for name, lin in originals.items():
        set_linear(model, name, _Recorder(lin, name, hessians, first_weight))
    scorer = Scorer(model, torch.float32)
    for s in seqs:  # logits for every position, so the LM head sees every row
        scorer.continuation_logits(s[:1], s[1:])
    for name, lin in originals.items():
        set_linear(model, name, lin)
    return hessians


def gptq_int4(w: torch.Tensor, hessian: torch.Tensor, damp: float = 0.01, block: int = 128,
              rows: int = 16384) -> torch.Tensor:
    """Effective int4 weights [N, K] of w by GPTQ on the groups of Int4Weights."""
    w = w.float().clone()
    n, k = w.shape
    h = hessian.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(k)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    out = torch.empty_like(w)
    for r0 in range(0, n, rows):
        wr = w[r0 : r0 + rows]
        for c0 in range(0, k, block):
            c1 = min(c0 + block, k)
            w1, err = wr[:, c0:c1].clone(), torch.empty(wr.shape[0], c1 - c0)
            h1 = hinv[c0:c1, c0:c1]
            for i in range(c1 - c0):
                if (c0 + i) % INT4_GROUP_SIZE == 0:  # the group's grid, from its current values
                    g = w1[:, i : i + INT4_GROUP_SIZE].contiguous()
                    _, scale, lo = quantize_int4_groups(g, INT4_GROUP_SIZE)
                    span = torch.round((g.amax(1, keepdim=True) - lo) / scale)
                q = torch.minimum(torch.round((w1[:, i : i + 1] - lo) / scale).clamp(min=0), span)
                deq = (q * scale + lo)[:, 0]
                out[r0 : r0 + wr.shape[0], c0 + i] = deq
                e = (w1[:, i] - deq) / h1[i, i]
                w1[:, i:] -= e[:, None] * h1[i, i:][None, :]
                err[:, i] = e
            wr[:, c1:] -= err @ hinv[c0:c1, c1:]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", default="rtn:all,gptq:all,rtn:qkv,gptq:qkv,rtn:lm_head,"
                    "gptq:lm_head,rtn:o,rtn:gate_up,rtn:down")
    ap.add_argument("--calibration", type=int, default=8, help="sequences of 1,024 tokens")
    ap.add_argument("--out", default="bench/results/int4_sensitivity.json")
    args = ap.parse_args()
    variants = args.variants.split(",")
    parsed = [parse_variant(v) for v in variants]  # a typo fails before the slow part
    torch.set_num_threads(args.threads)
    loaded, tok, prompts = load_with_prompts(args.model)
    model = Gemma3Model(loaded.spec, loaded.weights, torch.float32, prepack=False)
    exact = {name: lin._plain.clone() for name, lin in model.linears.items()}
    ref = Scorer(model, torch.float32)
    tokens = ref.greedy(prompts, 64)
    ref_lps = [ref.continuation_logits(p, t).log_softmax(-1) for p, t in zip(prompts, tokens)]
    hessians = {}
    if any(method == "gptq" for method, _, _ in parsed):
        bos = loaded.spec.bos_token_id or 2
        hessians = collect_hessians(model, calibration_sequences(tok, bos, args.calibration, 1024))
    print(f"{'variant':<16} {'top1':>8} {'mean KL':>9} {'max KL':>8} {'quantize s':>10}")
    results = []
    for variant, (method, group, selection) in zip(variants, parsed):
        t0 = time.perf_counter()
        for name, w in exact.items():
            if not selected(name, selection):
                eff = w
            elif method == "gptq":
                eff = gptq_int4(w, hessians[name])
            else:
                eff = Int4Weights.quantize(w, group).dequantize(torch.float32)
            set_linear(model, name, DenseKernel(eff, torch.float32, prepack=False))
        seconds = time.perf_counter() - t0
        top1, kl, kl_max, _ = score(model, torch.float32, prompts, tokens, ref_lps)
        results.append({"variant": variant, "top1": top1, "kl_mean": kl, "kl_max": kl_max})
        print(f"{variant:<16} {100 * top1:>7.2f}% {kl:>9.4f} {kl_max:>8.3f} {seconds:>10.1f}",
              flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"calibration_modules": CALIBRATION_MODULES,
                               "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
