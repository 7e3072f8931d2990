"""Real Gemma 3 270M: GGUF conversion checked against transformers' own GGUF loader.

One conversion (fresh SWAKV_CACHE_DIR) is shared by the module.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"

pytestmark = pytest.mark.slow

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces and    runs of   spaces\n\n\ttabs\r\n",
    "Ünïcödé: naïve café, Straße, Ελληνικά, русский, 日本語のテキスト, 한국어",
    "emoji 😀👍🏽 🇩🇪 family 👨‍👩‍👧‍👦 and math ∑∫√∞",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
    "code: def f(x):\n    return x ** 2  # comment",
    "",
]
MESSAGES = [
    [{"role": "user", "content": "Hi there!"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "  Name a color.  "},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another 😀"},
    ],
]


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    cache = tmp_path_factory.mktemp("swakv-cache")
    old = os.environ.get("SWAKV_CACHE_DIR")
    os.environ["SWAKV_CACHE_DIR"] = str(cache)
    from swakv.model.loader import default_gguf_path, resolve_model

    t0 = time.perf_counter()
    model_dir = resolve_model(None)
    convert_s = time.perf_counter() - t0
    print(f"\nGGUF -> HF conversion (assemble + dequantize + tokenizer): {convert_s:.1f} s")
    yield {"dir": model_dir, "gguf": default_gguf_path(), "cache": cache, "convert_s": convert_s}
    if old is None:
        os.environ.pop("SWAKV_CACHE_DIR", None)
    else:
        os.environ["SWAKV_CACHE_DIR"] = old


@pytest.fixture(scope="module")
def hf_gguf_tokenizer(converted: dict[str, Any]) -> Any:
    from transformers import AutoTokenizer

    g: Path = converted["gguf"]
    return AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name, local_files_only=True)


def test_conversion_layout(converted: dict[str, Any]) -> None:
    d: Path = converted["dir"]
    assert d == converted["cache"] / "models" / "gemma3-270m-q4_k_m"
    names = {p.name for p in d.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not [p for p in d.parent.iterdir() if p.name.startswith(".")]  # no temp leftovers


@pytest.fixture(scope="module")
def hf_reference(converted: dict[str, Any]) -> dict[str, Any]:
    """transformers' own reading of the GGUF: its config and its dequantized tensors.

    The meta-device skeleton (only used for the GGUF -> HF name map) is built from
    our config; the config compared against is the one transformers parses from GGUF.
    """
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    ours = Gemma3TextConfig.from_pretrained(str(converted["dir"]), local_files_only=True)
    with torch.device("meta"):
        skeleton = Gemma3ForCausalLM(ours)
    parsed = load_gguf_checkpoint(
        str(converted["gguf"]), return_tensors=True, model_to_load=skeleton
    )
    return {"config": Gemma3TextConfig.from_dict(parsed["config"]), "tensors": parsed["tensors"]}


def test_every_tensor_equals_transformers_gguf_load(
    converted: dict[str, Any], hf_reference: dict[str, Any]
) -> None:
    from swakv.model.loader import load_model_dir

    ref = hf_reference["tensors"]
    ours = load_model_dir(converted["dir"]).weights
    assert set(ours) == set(ref)
    for name, t in ref.items():
        assert ours[name].dtype == torch.float32
        assert ours[name].shape == t.shape, name
        assert torch.equal(ours[name], t.to(torch.float32)), name


def test_spec_and_config_match_transformers(
    converted: dict[str, Any], hf_reference: dict[str, Any]
) -> None:
    from transformers import AutoConfig

    from swakv.model.loader import load_model_dir, spec_from_hf_config

    hf_cfg = hf_reference["config"]
    ours_cfg = AutoConfig.from_pretrained(str(converted["dir"]), local_files_only=True)
    for key in (
        "layer_types",
        "sliding_window",
        "rope_parameters",
        "head_dim",
        "num_key_value_heads",
        "num_attention_heads",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "query_pre_attn_scalar",
        "final_logit_softcapping",
        "attn_logit_softcapping",
        "max_position_embeddings",
        "tie_word_embeddings",
    ):
        assert getattr(ours_cfg, key) == getattr(hf_cfg, key), key
    assert ours_cfg.rms_norm_eps == pytest.approx(hf_cfg.rms_norm_eps, rel=1e-6)
    spec = load_model_dir(converted["dir"]).spec
    assert spec == spec_from_hf_config(ours_cfg.to_dict())
    assert spec.num_layers == 18 and spec.full_layer_ids == (5, 11, 17)
    assert spec.window == 512 and spec.num_heads == 4 and spec.hidden_size == 640
    assert {(a.num_kv_heads, a.head_dim) for a in spec.layers} == {(1, 256)}
    assert {a.rope_theta for a in spec.layers if a.is_sliding} == {10_000.0}
    assert {a.rope_theta for a in spec.layers if not a.is_sliding} == {1_000_000.0}
    assert spec.query_pre_attn_scalar == 256 and spec.vocab_size == 262_144
    assert spec.attn_logit_softcap is None and spec.final_logit_softcap is None
    assert (spec.bos_token_id, spec.eos_token_ids, spec.pad_token_id) == (2, (1, 106), 0)


def test_transformers_loads_converted_dir(converted: dict[str, Any]) -> None:
    from transformers import Gemma3ForCausalLM

    model, info = Gemma3ForCausalLM.from_pretrained(
        str(converted["dir"]), dtype=torch.float32, local_files_only=True, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    from swakv.model.tokenizer import load_tokenizer

    tok = load_tokenizer(converted["dir"])
    ids = tok.encode("The capital of France is")
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    top = [tok.decode([int(i)]).strip() for i in logits.topk(10).indices]
    assert "Paris" in top, top


def test_cached_reload_is_fast(converted: dict[str, Any]) -> None:
    from swakv.model.loader import load_model_dir, resolve_model
    from swakv.model.tokenizer import load_tokenizer

    t0 = time.perf_counter()
    d = resolve_model("gemma3-270m")
    loaded = load_model_dir(d)
    total = sum(float(t.sum()) for t in loaded.weights.values())  # touch every byte
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    load_tokenizer(d)
    tok_s = time.perf_counter() - t0
    print(
        f"\ncached reload: weights {load_s:.2f} s (incl. touching all pages), tokenizer {tok_s:.2f} s"
    )
    assert d == converted["dir"] and total == total
    assert load_s < 10.0
    assert tok_s < 5.0


def test_tokenizer_parity(converted: dict[str, Any], hf_gguf_tokenizer: Any) -> None:
    from swakv.model.tokenizer import load_tokenizer

    tok = load_tokenizer(converted["dir"])
    hf = hf_gguf_tokenizer
    assert tok.bos_id == hf.bos_token_id == 2
    assert tok.eos_ids == (1, 106)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf(text)["input_ids"], text
        assert tok.encode(text, add_bos=False) == hf(text, add_special_tokens=False)["input_ids"]
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(
                ids, skip_special_tokens=skip
            )
        assert tok.decode(ids) == text or "<start_of_turn>" in text


def test_incremental_decode_real_vocab(converted: dict[str, Any]) -> None:
    from swakv.model.tokenizer import load_tokenizer

    tok = load_tokenizer(converted["dir"])
    for text in TEXTS:
        ids = tok.encode(text)
        dec = tok.incremental_decoder()
        pieces = [dec.push(i) for i in ids]
        assert all("\ufffd" not in p for p in pieces)
        assert "".join(pieces) + dec.flush() == tok.decode(ids)


def test_chat_template_matches_transformers(
    converted: dict[str, Any], hf_gguf_tokenizer: Any
) -> None:
    from transformers import AutoTokenizer

    from swakv.model.tokenizer import GEMMA3_CHAT_TEMPLATE, load_tokenizer

    tok = load_tokenizer(converted["dir"])
    hf_dir = AutoTokenizer.from_pretrained(str(converted["dir"]), local_files_only=True)
    for msgs in MESSAGES:
        for gen in (True, False):
            text = tok.apply_chat_template(msgs, add_generation_prompt=gen)
            ref = hf_gguf_tokenizer.apply_chat_template(
                msgs, chat_template=GEMMA3_CHAT_TEMPLATE, tokenize=False, add_generation_prompt=gen
            )
            assert text == ref
            assert text == hf_dir.apply_chat_template(
                msgs, tokenize=False, add_generation_prompt=gen
            )
            ref_ids = hf_gguf_tokenizer.apply_chat_template(
                msgs,
                chat_template=GEMMA3_CHAT_TEMPLATE,
                tokenize=True,
                add_generation_prompt=gen,
                return_dict=False,
            )
            assert tok.encode(text, add_bos=False) == list(ref_ids)
