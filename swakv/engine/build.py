"""Building an engine from a model name or path: load weights, tokenizer, model code.

`build` also applies the model-level settings EngineCore does not read itself:
`dtype` auto is resolved (and the choice logged), `seed` seeds the global RNG that
unseeded requests sample from, `chat_template` replaces the model's template, and
`generation_config` selects the default sampling values returned alongside.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import torch

from swakv.config import EngineConfig, resolve_dtype
from swakv.engine.core import EngineCore
from swakv.model.generation_config import GenerationConfig, load_generation_config
from swakv.model.loader import (
    BASE_MODEL_NOTE,
    DEFAULT_MODEL_ALIASES,
    DEFAULT_MODEL_IS_BASE,
    load_model_dir,
    resolve_model,
)
from swakv.model.tokenizer import Tokenizer, chat_template_source
from swakv.sched.sizing import PoolSizes

log = logging.getLogger("swakv.engine")
T = TypeVar("T")


@dataclass(frozen=True)
class BuiltEngine:
    engine: EngineCore  # engine.cfg.dtype is resolved: "float32" or "bfloat16", never "auto"
    model_dir: Path  # the resolved Hugging Face-style directory
    generation: GenerationConfig  # request defaults (empty with --generation-config none)



def off_the_main_thread(fn: Callable[[], T]) -> T:
    """Run `fn` (a model load) on a short-lived thread and return its result or raise.

    Why: with this torch (OpenMP via libgomp), once the main thread has run parallel
    torch work and lives on, parallel regions on every other thread run 20-30% slower
    (measured with the default model, bf16, 2 cores: a 2,000-token prefill at 1,650 vs
    2,250 tok/s, batch-1 decode at 45 vs 66 tok/s); a thread that ran them and ended
    leaves no such cost. The server computes on its engine thread, so it loads the
    model (weight packing, pool allocation) here and the main thread never computes.
    """
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as e:  # re-raised on the caller's thread
            box["error"] = e

    thread = threading.Thread(target=run, name="swakv-load", daemon=True)
    thread.start()
    while thread.is_alive():  # a timed join keeps Ctrl-C responsive
        thread.join(0.2)
    if "error" in box:
        raise box["error"]
    return box["result"]

def build(model: str | None, cfg: EngineConfig, sizes: PoolSizes | None = None) -> BuiltEngine:
    """Resolve `model` (None: the default Gemma 3 270M), load it and size the pools.

    `sizes` overrides the pool sizing (tests use it for tight pools). Raises
    ModelLoadError / TokenizerLoadError / ChatTemplateError / GenerationConfigError
    for files that cannot be used, before any pool is allocated.
    """
    from swakv.model.gemma3 import Gemma3Model  # heavy import, after config validation

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    dtype = resolve_dtype(cfg.dtype)
    cfg = replace(cfg, dtype=dtype.name)
    path = resolve_model(model)
    generation = load_generation_config(cfg.generation_config, path)
    loaded = load_model_dir(path)
    tokenizer = Tokenizer.from_dir(path, extra_eos_ids=loaded.spec.eos_token_ids)
    if cfg.chat_template is not None:
        tokenizer.set_chat_template(chat_template_source(cfg.chat_template))
    log.info("dtype %s (%s)", dtype.name, dtype.reason)
    if cfg.seed is not None:
        torch.manual_seed(cfg.seed)
    net = Gemma3Model(loaded.spec, loaded.weights, cfg.torch_dtype, quantization=cfg.quantization,
                      weights_dir=path)
    log.info("loaded %s from %s", loaded.spec.arch, path)
    if (model is None or str(model) in DEFAULT_MODEL_ALIASES) and DEFAULT_MODEL_IS_BASE:
        log.info("note: %s", BASE_MODEL_NOTE)
    log.info("generation config: %s", generation.describe())
    return BuiltEngine(EngineCore(loaded.spec, net, tokenizer, cfg, sizes=sizes), path,
                       generation)


def build_engine(model: str | None, cfg: EngineConfig, sizes: PoolSizes | None = None
                 ) -> EngineCore:
    """`build(...).engine`: the engine alone."""
    return build(model, cfg, sizes).engine


def chat_prompt_ids(tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]]) -> list[int]:
    """Token ids of a conversation rendered with the model's chat template.

    The template usually emits the BOS token itself; it is not added twice.
    """
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    bos = tokenizer.special_tokens.get("bos_token")
    return tokenizer.encode(text, add_bos=not (bos and text.startswith(bos)))
