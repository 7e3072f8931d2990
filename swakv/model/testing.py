"""Test helpers: a tiny random Gemma 3 model directory and the transformers oracle.

`make_tiny_gemma3_dir` builds, with `transformers`, a random-weight Gemma 3 text
model small enough for unit tests and saves it in exactly the layout
`swakv.model.loader.load_model_dir` and `swakv.model.tokenizer.load_tokenizer` read
(config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
chat_template.jinja, and generation_config.json only when `generation_config` is
given). `transformers` is imported inside the functions only. `prompt_logits` runs one
prompt through a model on fresh pools.
"""

from __future__ import annotations

import json
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from swakv.model.tokenizer import GEMMA3_CHAT_TEMPLATE, write_tokenizer_config

# Tiny tokenizer layout: ids 0..5 are Gemma's special tokens (same ids and strings
# as the real model for 0..3), 6 is the word-boundary piece "▁", then printable
# ASCII 0x20..0x7e (as single-char pieces), then, when the vocabulary has room, the
# 256 byte-fallback pieces "<0x00>".."<0xFF>" (so any UTF-8 text round-trips).
TINY_SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>")
TINY_PAD_ID, TINY_EOS_ID, TINY_BOS_ID, TINY_UNK_ID, TINY_SOT_ID, TINY_EOT_ID = range(6)
_SPACE_PIECE = "\u2581"


def tiny_layer_types(num_layers: int, sliding_pattern: int | Sequence[str]) -> list[str]:
    """HF layer_types: an int p makes layer i full iff (i+1) % p == 0; a sequence of
    "sliding_attention"/"full_attention" (or "s"/"f") is used as given."""
    if isinstance(sliding_pattern, int):
        return [
            "full_attention" if (i + 1) % sliding_pattern == 0 else "sliding_attention"
            for i in range(num_layers)
        ]
    short = {"s": "sliding_attention", "f": "full_attention"}
    types = [short.get(t, t) for t in sliding_pattern]
    if len(types) != num_layers:
        raise ValueError(f"sliding_pattern has {len(types)} entries for {num_layers} layers")
    return types


def make_tiny_gemma3_dir(
    path: str | Path,
    num_layers: int = 5,
    window: int = 8,
    vocab: int = 128,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 16,
    intermediate: int = 128,
    seed: int = 0,
    sliding_pattern: int | Sequence[str] = 3,
    max_position_embeddings: int = 4096,
    rope_scaling_factor: float = 1.0,
    final_logit_softcap: float | None = None,
    attn_logit_softcap: float | None = None,
    generation_config: dict[str, Any] | None = None,
) -> Path:
    """Create a random fp32 Gemma 3 text model dir at `path` and return the path.

    Default layout (5 layers, pattern 3): sliding, sliding, full, sliding, sliding,
    window 8. All weights, norm weights included (so the `x * (1 + w)` form matters),
    are drawn from a seeded generator; the same arguments give identical files.
    The tokenizer covers printable ASCII when vocab >= 103 (smaller vocabularies
    keep a prefix of it, see `tiny_vocab`) and all UTF-8 when vocab >= 359.
    `generation_config` (e.g. {"temperature": 0.5, "top_k": 7}) is written as the
    model's generation_config.json; without it the directory has none.
    """
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    full_rope: dict[str, Any] = {"rope_type": "default", "rope_theta": 1_000_000.0}
    if rope_scaling_factor != 1.0:
        full_rope = {
            "rope_type": "linear",
            "rope_theta": 1_000_000.0,
            "factor": rope_scaling_factor,
        }
    config = Gemma3TextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        sliding_window=window,
        layer_types=tiny_layer_types(num_layers, sliding_pattern),
        rope_parameters={
            "full_attention": full_rope,
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
        query_pre_attn_scalar=head_dim,
        max_position_embeddings=max_position_embeddings,
        final_logit_softcapping=final_logit_softcap,
        attn_logit_softcapping=attn_logit_softcap,
        bos_token_id=TINY_BOS_ID,
        eos_token_id=[TINY_EOS_ID, TINY_EOT_ID],
        pad_token_id=TINY_PAD_ID,
        tie_word_embeddings=True,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(config).eval()
    _randomize_(model, seed)
    model.save_pretrained(path)
    gen_file = path / "generation_config.json"
    if generation_config is None:
        gen_file.unlink(missing_ok=True)  # save_pretrained may write HF's defaults
    else:
        gen_file.write_text(json.dumps(generation_config, indent=2))
    _write_tiny_tokenizer(path, vocab)
    return path


def _randomize_(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter with seeded noise: matrices ~ N(0, 1/fan_in), norms ~ N(0, 0.3)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.ndim == 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * p.shape[1] ** -0.5)


def tiny_vocab(vocab: int) -> dict[str, int]:
    """The tiny tokenizer's piece -> id map for a model vocabulary of `vocab` ids.

    Pieces in id order: the 6 specials, "▁", "\n", lowercase, uppercase, digits,
    other printable ASCII, "\t" -- truncated to `vocab` (characters left out map
    to <unk>) -- then the 256 byte-fallback pieces if all of those fit as well.
    Example: vocab=64 keeps specials, "▁", "\n", a-z, A-Z and "0".."3".
    """
    if vocab < len(TINY_SPECIAL_TOKENS) + 1:
        raise ValueError(
            f"tiny tokenizer needs vocab >= {len(TINY_SPECIAL_TOKENS) + 1}, got {vocab}"
        )
    ascii_rest = [chr(c) for c in range(0x21, 0x7F) if not chr(c).isalnum()]
    chars = [*string.ascii_lowercase, *string.ascii_uppercase, *string.digits, *ascii_rest, "\t"]
    pieces = [*TINY_SPECIAL_TOKENS, _SPACE_PIECE, "\n", *chars][:vocab]
    if vocab >= len(pieces) + 256:
        pieces += [f"<0x{b:02X}>" for b in range(256)]
    return {p: i for i, p in enumerate(pieces)}


def build_tiny_tokenizer(vocab: int) -> Any:
    """A Gemma-shaped `tokenizers.Tokenizer` (char-level BPE, byte fallback when it fits)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    v = tiny_vocab(vocab)
    byte_fallback = "<0x00>" in v
    tok = Tokenizer(
        models.BPE(
            vocab=v, merges=[], unk_token="<unk>", byte_fallback=byte_fallback, fuse_unk=True
        )
    )
    tok.normalizer = normalizers.Replace(" ", _SPACE_PIECE)
    tok.decoder = decoders.Sequence(
        [decoders.Replace(_SPACE_PIECE, " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in TINY_SPECIAL_TOKENS]
    )
    return tok


def _write_tiny_tokenizer(path: Path, vocab: int) -> None:
    build_tiny_tokenizer(vocab).save(str(path / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
    }
    write_tokenizer_config(path, cfg, GEMMA3_CHAT_TEMPLATE)


def load_hf_reference(path: str | Path) -> Any:
    """transformers' Gemma3ForCausalLM for a model dir: fp32, eval, eager attention.

    Test oracle only (imports transformers).
    """
    from transformers import Gemma3ForCausalLM

    model = Gemma3ForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, attn_implementation="eager", local_files_only=True
    )
    return model.eval()


def read_config_json(path: str | Path) -> dict[str, Any]:
    """The config.json of a model dir as a dict."""
    return json.loads((Path(path) / "config.json").read_text())


def prompt_logits(model: Any, ids: list[int]) -> torch.Tensor:
    """fp32 [len(ids), vocab]: `model`'s logits at every position of one prompt, run as
    one forward on fresh pools sized for up to 60 tokens (pages of 4); integrity is
    checked after the forward and after its pages are freed, when all must be back."""
    from swakv.config import KVLayout
    from swakv.engine.runner import BatchItem, ModelRunner
    from swakv.memory import KVPool, ReqTable, SWAAllocator

    alloc = SWAAllocator(16, 16, 4)
    pool = KVPool(KVLayout.from_model(model.spec, model.dtype), alloc)
    table = ReqTable(1, 64)
    runner = ModelRunner(model, pool, table, validate=True)
    row = table.alloc_row()
    table.write(row, 0, alloc.alloc(len(ids)))
    out = runner.forward([BatchItem(row, 0, ids)], return_all_logits=True)
    assert out.all_logits is not None
    alloc.check_integrity()
    alloc.free(table.slots[row, : len(ids)])
    table.free_row(row)
    alloc.check_integrity()
    table.check_integrity()
    assert alloc.available() == alloc.total(), "prompt_logits leaked pages"
    return out.all_logits[0]
