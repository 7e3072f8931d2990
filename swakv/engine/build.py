"""Building an engine from a model name or path: load weights, tokenizer, model code."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from swakv.config import EngineConfig
from swakv.engine.core import EngineCore
from swakv.model.loader import load_model_dir, resolve_model
from swakv.model.tokenizer import Tokenizer
from swakv.sched.sizing import PoolSizes

log = logging.getLogger("swakv.engine")


def build_engine(model: str | None, cfg: EngineConfig, sizes: PoolSizes | None = None) -> EngineCore:
    """Resolve `model` (None: the default Gemma 3 270M), load it and size the pools.

    `sizes` overrides the pool sizing (tests use it for tight pools).
    """
    from swakv.model.gemma3 import Gemma3Model  # heavy import, after config validation

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    path = resolve_model(model)
    loaded = load_model_dir(path)
    tokenizer = Tokenizer.from_dir(path, extra_eos_ids=loaded.spec.eos_token_ids)
    net = Gemma3Model(loaded.spec, loaded.weights, cfg.torch_dtype, quantization=cfg.quantization, weights_dir=path)
    log.info("loaded %s from %s", loaded.spec.arch, path)
    return EngineCore(loaded.spec, net, tokenizer, cfg, sizes=sizes)


def chat_prompt_ids(tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]]) -> list[int]:
    """Token ids of a conversation rendered with the model's chat template.

    The template usually emits the BOS token itself; it is not added twice.
    """
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    bos = tokenizer.special_tokens.get("bos_token")
    return tokenizer.encode(text, add_bos=not (bos and text.startswith(bos)))
