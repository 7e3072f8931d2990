"""Quality of the quantized modes against the float32 reference on the real model.

32 fixed prompts (8 of 5-19 tokens, 8 of 55-141, 8 of 382-534 and 8 of 917-1,248
tokens: 10 beyond the 512-token window), 64 tokens each: the float32 model generates the
greedy continuation, then every mode scores prompt + continuation teacher-forced (one
extend per prompt), in each activation dtype of --dtypes (bfloat16 and float32: the
model dtype, which the weight-only kernels compute in), and is compared with float32
at the 64 continuation positions:

    top1  share of positions where the mode's argmax is float32's greedy token
    kl    mean KL(p_fp32 || p_mode) over those positions (nats)

Each mode is scored twice, with every linear forced (`QuantLinear.dispatch`) to the
kernel its dispatch runs for the smallest batches ("small": weight-only int8 / int4,
what batch-1 decode runs) and for the largest ("large": dense on the dequantized
weights, or w8a8 for the w8a8 mode's layers, what prefill chunks run); a one-pass
extend would otherwise only exercise the large-batch kernels. A mode passes in a dtype
when both paths meet the targets (int8: top1 >= 99%, kl <= 0.01; int4 and w8a8: top1
>= 95%, kl <= 0.05). `none` in bf16 is listed for scale: bf16 rounding alone already
costs top-1 agreement (98.2%), which bounds what any bf16-activation mode can reach.

    flock /tmp/swakv-cpu.lock .venv/bin/python bench/quant_quality.py
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from swakv.config import KVLayout
from swakv.engine.runner import BatchItem, ModelRunner
from swakv.memory import KVPool, ReqTable, SWAAllocator
from swakv.model.gemma3 import Gemma3Model
from swakv.model.loader import LoadedModel, load_model_dir, resolve_model
from swakv.model.quant import Dispatch, QuantLinear
from swakv.model.tokenizer import Tokenizer

PAGE = 16
TARGETS = {"int8": (0.99, 0.01), "int4": (0.95, 0.05), "w8a8": (0.95, 0.05)}

SHORT = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Three primary colors are",
    "Q: What is the boiling point of water at sea level?\nA:",
    "Once upon a time, in a village by the sea,",
    "To make a cup of tea, first",
    "SELECT name, COUNT(*) FROM orders",
    "The theory of relativity was developed by",
]
PARAGRAPHS = [
    "The history of the printing press begins in the fifteenth century, when Johannes "
    "Gutenberg combined movable metal type, oil-based ink and a screw press adapted from "
    "wine making. Books that had taken scribes months to copy could now be produced in "
    "days, and within fifty years presses were running in more than two hundred European "
    "cities. Literacy spread, prices fell, and ideas travelled faster than ever before.",
    "A hash table stores key-value pairs in an array of buckets. A hash function maps each "
    "key to a bucket index; collisions are resolved by chaining or by open addressing. "
    "With a good hash function and a load factor kept below a constant, lookups, inserts "
    "and deletes take expected constant time, which is why hash tables back the "
    "dictionaries of most programming languages.",
    "Photosynthesis converts light energy into chemical energy. In the thylakoid "
    "membranes of chloroplasts, chlorophyll absorbs photons and drives the splitting of "
    "water, releasing oxygen and producing ATP and NADPH. The Calvin cycle then uses these "
    "carriers to fix carbon dioxide into three-carbon sugars that the plant turns into "
    "glucose, starch and cellulose.",
    "The marathon commemorates the legend of a Greek messenger who ran from the "
    "battlefield of Marathon to Athens. The modern distance of 42.195 kilometres was "
    "fixed after the 1908 London Olympics, where the course was extended so that the race "
    "could start at Windsor Castle and finish in front of the royal box.",
    "To bake bread, mix flour, water, salt and yeast into a dough and knead it until it is "
    "smooth and elastic. Let it rise in a warm place until it doubles in size, shape it "
    "into a loaf, let it rise again, and bake it in a hot oven until the crust is brown "
    "and the loaf sounds hollow when tapped on the bottom.",
    "In economics, inflation is the rate at which the general level of prices rises. "
    "Central banks usually target a low, stable rate, raising interest rates when "
    "inflation runs above the target to cool demand and lowering them when the economy "
    "weakens. Expectations matter: if people expect prices to rise, they ask for higher "
    "wages, which can make inflation persist.",
    "The Rust programming language guarantees memory safety without a garbage collector. "
    "Its ownership system tracks which part of the program owns each value; borrowing "
    "rules allow either many shared references or one mutable reference at a time, and "
    "the compiler rejects programs that could produce data races or dangling pointers.",
    "Mount Everest, on the border between Nepal and China, is the highest mountain above "
    "sea level at 8,849 metres. The first confirmed ascent was made in 1953 by Edmund "
    "Hillary and Tenzing Norgay. Climbers today face thin air, extreme cold, avalanches "
    "and crowded routes during the short spring weather window.",
    "A transformer language model reads a sequence of tokens, embeds each one as a vector "
    "and passes the vectors through layers of self-attention and feed-forward networks. "
    "Attention lets every position combine information from earlier positions; sliding "
    "window attention limits each position to a fixed number of recent tokens, which "
    "keeps the memory for cached keys and values bounded.",
    "The water cycle moves water between the oceans, the atmosphere and the land. The sun "
    "evaporates water from seas and lakes, the vapour condenses into clouds, and rain or "
    "snow returns it to the surface, where rivers and groundwater carry it back to the "
    "sea. Plants add to the cycle by releasing water vapour through their leaves.",
    "Chess is played on a board of sixty-four squares. Each player starts with sixteen "
    "pieces: a king, a queen, two rooks, two bishops, two knights and eight pawns. The "
    "goal is to checkmate the opposing king, attacking it so that it has no legal move "
    "that escapes the attack. Openings, middlegames and endgames each have their theory.",
    "Vaccines train the immune system to recognise a pathogen without causing the "
    "disease. They may contain weakened or inactivated microbes, purified proteins, or "
    "genetic instructions that make cells produce a harmless piece of the pathogen. "
    "Memory cells formed after vaccination respond quickly if the real infection comes.",
    "The Great Barrier Reef stretches for more than two thousand kilometres along the "
    "coast of Queensland. It is built by colonies of tiny coral polyps that live in "
    "partnership with algae; when the water grows too warm, the corals expel the algae "
    "and turn white, and repeated bleaching events have killed large parts of the reef.",
    "Version control systems record the history of a set of files. Git stores snapshots "
    "as a graph of commits, each pointing to its parents; branches are movable names for "
    "commits, and merging combines the work of two branches. Because every clone holds "
    "the full history, developers can work offline and share changes when they are ready.",
    "The Roman aqueducts carried water across valleys and hills using only gravity. "
    "Engineers kept a gentle, constant slope over dozens of kilometres, built arched "
    "bridges where the ground fell away and tunnels where it rose, and delivered water "
    "to public fountains, baths and the houses of the wealthy.",
    "Sleep is divided into cycles of about ninety minutes. Each cycle passes through light "
    "sleep, deep slow-wave sleep and rapid eye movement sleep, when most vivid dreams "
    "occur. Deep sleep helps the body recover, while REM sleep seems to matter for memory "
    "and mood; adults usually need seven to nine hours a night.",
    "A binary search finds a value in a sorted array by repeatedly halving the range that "
    "can contain it. Compare the target with the middle element: if it is smaller, keep "
    "the left half, otherwise the right half. After about log2(n) steps the range is "
    "empty or holds the target, which makes the search fast even for huge arrays.",
    "Jazz grew out of the blues, ragtime and brass band music of New Orleans in the early "
    "twentieth century. Musicians improvised over chord progressions, traded solos and "
    "played with a swinging rhythm. Later styles such as bebop, cool jazz and fusion "
    "pushed the harmony further and borrowed from classical and rock music.",
    "Volcanoes form where molten rock reaches the surface. At subduction zones one "
    "tectonic plate sinks beneath another and melts, feeding explosive volcanoes such as "
    "those around the Pacific Ring of Fire; at hot spots like Hawaii, plumes of hot mantle "
    "produce broad shield volcanoes with runny lava flows.",
    "Good unit tests are small, fast and deterministic. Each checks one behaviour with "
    "exact expected values, uses real objects where they are cheap, and fails with a "
    "message that points at the cause. A test that passes whatever the code does is worse "
    "than no test, because it gives confidence that nothing has earned.",
]


def fixed_prompts() -> list[str]:
    """32 prompts: 8 SHORT, 8 of 1-2 paragraphs, 8 of 6-8 and 8 of 14-19 paragraphs
    (every paragraph at most once per prompt)."""
    n = len(PARAGRAPHS)

    def join(start: int, count: int) -> str:
        return "\n\n".join(PARAGRAPHS[(start + i) % n] for i in range(count))

    medium = [join(i, 1 + i % 2) for i in range(8)]
    long = [join(3 * i, 6 + i % 3) for i in range(8)]
    very_long = [join(5 * i, 14 + i % 6) for i in range(8)]
    return SHORT + medium + long + very_long


class Scorer:
    """Teacher-forced scoring of `prompt + continuation` on one model (fresh pools)."""

    def __init__(self, model: Gemma3Model, dtype: torch.dtype) -> None:
        self.model, self.dtype = model, dtype

    def _runner(self, num_rows: int, max_len: int) -> tuple[ModelRunner, SWAAllocator, ReqTable]:
        pages = num_rows * (-(-max_len // PAGE) + 1)
        alloc = SWAAllocator(pages, pages, PAGE)
        pool = KVPool(KVLayout.from_model(self.model.spec, self.dtype), alloc)
        table = ReqTable(num_rows, max_len + PAGE)
        return ModelRunner(self.model, pool, table), alloc, table

    def continuation_logits(self, prompt: list[int], continuation: list[int]) -> torch.Tensor:
        """fp32 [len(continuation), vocab]: logits predicting each continuation token."""
        seq = prompt + continuation[:-1]
        runner, alloc, table = self._runner(1, len(seq))
        row = table.alloc_row()
        table.write(row, 0, alloc.alloc(len(seq)))
        with torch.inference_mode():
            meta = runner.build_metadata([BatchItem(row, 0, seq)])
            hidden = self.model.forward(torch.tensor(seq), meta, runner.kv_pool)
            return self.model.compute_logits(hidden[-len(continuation):])

    def greedy(self, prompts: Sequence[list[int]], new_tokens: int) -> list[list[int]]:
        """Greedy continuations of all prompts, decoded as one batch."""
        longest = max(len(p) for p in prompts) + new_tokens
        runner, alloc, table = self._runner(len(prompts), longest)
        rows = []
        for p in prompts:
            row = table.alloc_row()
            table.write(row, 0, alloc.alloc(len(p)))
            rows.append(row)
        out = runner.forward([BatchItem(r, 0, p) for r, p in zip(rows, prompts)])
        cur = torch.tensor([len(p) for p in prompts])
        generated: list[list[int]] = [[] for _ in prompts]
        for step in range(new_tokens):
            nxt = out.last_logits.argmax(dim=-1)
            for g, t in zip(generated, nxt.tolist()):
                g.append(t)
            if step == new_tokens - 1:
                break
            slots = alloc.alloc_decode(cur, table.slots[rows, cur - 1])
            table.slots[rows, cur] = slots
            out = runner.forward([BatchItem(r, int(c), [t])
                                  for r, c, t in zip(rows, cur.tolist(), nxt.tolist())])
            cur = cur + 1
        return generated


@dataclass(frozen=True)
class Score:
    mode: str
    dtype: str  # activation (model) dtype: "bfloat16" / "float32"
    path: str  # "small" / "large" (forced), "dense" for none
    kernels: str
    top1: float
    kl_mean: float
    kl_max: float
    positions: int
    seconds: float


class Comparison:
    """Accumulates top-1 agreement and KL(p_fp32 || p_mode) over scored positions."""

    def __init__(self) -> None:
        self.agree, self.kls = 0, []

    def add(self, ref_logprobs: torch.Tensor, logits: torch.Tensor, tokens: list[int]) -> None:
        self.agree += int((logits.argmax(-1) == torch.tensor(tokens)).sum())
        lp = logits.double().log_softmax(-1)
        ref = ref_logprobs.double()
        self.kls.append((ref.exp() * (ref - lp)).sum(-1))

    def result(self) -> tuple[float, float, float, int]:
        """(top-1 agreement, mean KL, max KL, positions)."""
        kl = torch.cat(self.kls)
        return self.agree / kl.numel(), float(kl.mean()), float(kl.max()), int(kl.numel())


def load_with_prompts(model: str | None) -> tuple[LoadedModel, Tokenizer, list[list[int]]]:
    """The model (`--model`, default: the packaged one), its tokenizer and the fixed
    prompts as token ids."""
    path = resolve_model(model)
    loaded = load_model_dir(path)
    tok = Tokenizer.from_dir(path, extra_eos_ids=loaded.spec.eos_token_ids)
    return loaded, tok, [tok.encode(p, add_bos=True) for p in fixed_prompts()]


def score(model: Gemma3Model, dtype: torch.dtype, prompts: Sequence[list[int]],
          tokens: Sequence[list[int]], ref_logprobs: Sequence[torch.Tensor]
          ) -> tuple[float, float, float, int]:
    """(top-1 agreement, mean KL, max KL, positions) of `model` teacher-forced on every
    prompt + continuation against the reference log-probabilities."""
    scorer = Scorer(model, dtype)
    cmp = Comparison()
    for p, t, ref_lp in zip(prompts, tokens, ref_logprobs):
        cmp.add(ref_lp, scorer.continuation_logits(p, t), t)
    return cmp.result()


PATHS = ("small", "large")  # the first / last kernel of every linear's dispatch


def force_path(model: Gemma3Model, path: str) -> str:
    """Make every linear run its small-batch (first) or large-batch (last) kernel;
    returns the kernels used, e.g. "w8a8+dense" (layers w8a8, LM head dense)."""
    used = []
    for lin in model.linears.values():
        assert isinstance(lin, QuantLinear)
        steps = lin.dispatch.steps
        kernel = steps[0][1] if path == "small" else steps[-1][1]
        lin.dispatch = Dispatch(((1, kernel),))
        if kernel not in used:
            used.append(kernel)
    return "+".join(used)


def evaluate(loaded: LoadedModel, prompts: Sequence[list[int]], new_tokens: int,
             modes: Sequence[str], dtypes: Sequence[str] = ("bfloat16",)
             ) -> tuple[list[Score], list[list[int]]]:
    """Score every mode in every activation dtype against float32 (the float32 `none`
    model is the reference itself and is skipped) on teacher-forced prompts."""
    ref_model = Gemma3Model(loaded.spec, loaded.weights, torch.float32)
    ref = Scorer(ref_model, torch.float32)
    tokens = ref.greedy(prompts, new_tokens)
    ref_logprobs = [ref.continuation_logits(p, t).log_softmax(-1)
                    for p, t in zip(prompts, tokens)]
    del ref_model, ref
    scores = []
    for dtype_name in dtypes:
        for mode in modes:
            if not (mode == "none" and dtype_name == "float32"):
                scores += _score_mode(loaded, mode, getattr(torch, dtype_name), prompts,
                                      tokens, ref_logprobs)
    return scores, tokens


def _score_mode(loaded: LoadedModel, mode: str, dtype: torch.dtype,
                prompts: Sequence[list[int]], tokens: Sequence[list[int]],
                ref_logprobs: Sequence[torch.Tensor]) -> list[Score]:
    """Scores of one mode in one activation dtype, per forced path."""
    model = Gemma3Model(loaded.spec, loaded.weights, dtype, quantization=mode,
                        weights_dir=loaded.path)
    plan = {lin: lin.dispatch for lin in model.linears.values()} if mode != "none" else {}
    scores = []
    for path in (PATHS if mode != "none" else ("dense",)):
        kernel = path
        if mode != "none":
            for lin, dispatch in plan.items():
                lin.dispatch = dispatch  # type: ignore[union-attr]
            kernel = force_path(model, path)
        t0 = time.perf_counter()
        top1, kl, kl_max, n = score(model, dtype, prompts, tokens, ref_logprobs)
        scores.append(Score(mode, str(dtype).removeprefix("torch."), path, kernel, top1, kl,
                            kl_max, n, time.perf_counter() - t0))
    return scores


def passes(mode: str, dtype: str, scores: Sequence[Score],
           targets: dict[str, tuple[float, float]]) -> bool:
    """Whether every path of `mode` in activation dtype `dtype` meets the targets."""
    top1, kl = targets[mode]
    mine = [s for s in scores if s.mode == mode and s.dtype == dtype]
    return bool(mine) and all(s.top1 >= top1 and s.kl_mean <= kl for s in mine)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--modes", default="none,int8,int4,w8a8")
    ap.add_argument("--dtypes", default="bfloat16,float32",
                    help="activation dtypes to score each mode in")
    ap.add_argument("--out", default="bench/results/quant_quality.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loaded, _, prompts = load_with_prompts(args.model)
    lengths = sorted(len(p) for p in prompts)
    print(f"{len(prompts)} prompts, {lengths[0]}-{lengths[-1]} tokens "
          f"({sum(n > 512 for n in lengths)} beyond 512), {args.new_tokens} tokens each")
    modes = args.modes.split(",")
    dtypes = args.dtypes.split(",")
    scores, _ = evaluate(loaded, prompts, args.new_tokens, modes, dtypes)
    print(f"\n{'mode':<6} {'dtype':<9} {'path':<6} {'kernels':<11} {'top1':>8} {'mean KL':>9} "
          f"{'max KL':>8} {'pass':>5}")
    for s in scores:
        ok = "" if s.mode not in TARGETS else (
            "yes" if passes(s.mode, s.dtype, [s], TARGETS) else "NO")
        print(f"{s.mode:<6} {s.dtype:<9} {s.path:<6} {s.kernels:<11} {100 * s.top1:>7.2f}% "
              f"{s.kl_mean:>9.5f} {s.kl_max:>8.4f} {ok:>5}")
    verdict = {f"{m}/{d}": passes(m, d, scores, TARGETS)
               for d in dtypes for m in modes if m in TARGETS}
    print("targets met:", verdict)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"prompt_lengths": [len(p) for p in prompts],
                               "new_tokens": args.new_tokens, "targets": TARGETS,
                               "scores": [asdict(s) for s in scores], "pass": verdict},
                              indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
