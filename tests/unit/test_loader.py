"""Fast tests of swakv.model.loader / tokenizer / testing on tiny models."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from swakv.config import AttnKind  # noqa: E402
from swakv.model import loader  # noqa: E402
from swakv.model.loader import (  # noqa: E402
    ModelLoadError,
    cache_dir,
    hf_tensor_name,
    load_model_dir,
    resolve_model,
    spec_from_hf_config,
)
from swakv.model.testing import (  # noqa: E402
    TINY_BOS_ID,
    TINY_EOS_ID,
    TINY_EOT_ID,
    load_hf_reference,
    make_tiny_gemma3_dir,
)
from swakv.model.tokenizer import ChatTemplateError, Tokenizer, load_tokenizer  # noqa: E402

BASE_CFG = {
    "model_type": "gemma3_text",
    "vocab_size": 100,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 12,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 8,
    "sliding_window": 16,
    "query_pre_attn_scalar": 8,
    "rms_norm_eps": 1e-6,
    "bos_token_id": 2,
    "eos_token_id": [1, 106],
    "pad_token_id": 0,
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_gemma3_dir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny_bytes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Vocabulary 512: the tiny tokenizer includes byte fallback (all UTF-8)."""
    return make_tiny_gemma3_dir(tmp_path_factory.mktemp("tinyb"), vocab=512, num_layers=2)


# ------------------------------------------------------------------ spec derivation


def _kinds(spec) -> str:
    return "".join("S" if a.is_sliding else "F" for a in spec.layers)


@pytest.mark.parametrize(
    ("extra", "kinds", "full_theta", "local_theta", "factor"),
    [
        # transformers 5 form
        (
            {
                "layer_types": ["sliding_attention"] * 5
                + ["full_attention"]
                + ["sliding_attention"] * 6,
                "rope_parameters": {
                    "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0},
                    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                },
            },
            "SSSSSFSSSSSS",
            1e6,
            1e4,
            8.0,
        ),
        # old hub form: pattern + rope_theta + rope_local_base_freq + rope_scaling
        (
            {
                "sliding_window_pattern": 6,
                "rope_theta": 1e6,
                "rope_local_base_freq": 1e4,
                "rope_scaling": {"rope_type": "linear", "factor": 8.0},
            },
            "SSSSSFSSSSSF",
            1e6,
            1e4,
            8.0,
        ),
        # old form without scaling, pattern 4
        ({"sliding_window_pattern": 4, "rope_theta": 5e5}, "SSSFSSSFSSSF", 5e5, 1e4, 1.0),
        # nothing given: HF defaults (pattern 6, 1e6 / 1e4)
        ({}, "SSSSSFSSSSSF", 1e6, 1e4, 1.0),
    ],
)
def test_spec_from_hf_config_table(extra, kinds, full_theta, local_theta, factor) -> None:
    spec = spec_from_hf_config({**BASE_CFG, **extra})
    assert _kinds(spec) == kinds
    for a in spec.layers:
        assert a.num_kv_heads == 1 and a.head_dim == 8
        if a.is_sliding:
            assert (a.window, a.rope_theta, a.rope_scaling_factor) == (16, local_theta, 1.0)
        else:
            assert (a.window, a.rope_theta, a.rope_scaling_factor) == (None, full_theta, factor)
    assert spec.window == 16
    assert spec.query_pre_attn_scalar == 8.0
    assert (spec.bos_token_id, spec.eos_token_ids, spec.pad_token_id) == (2, (1, 106), 0)
    assert spec.attn_logit_softcap is None and spec.final_logit_softcap is None


@pytest.mark.parametrize(
    "extra",
    [
        {
            "sliding_window_pattern": 6,
            "rope_theta": 1e6,
            "rope_local_base_freq": 1e4,
            "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        },
        {"sliding_window_pattern": 3},
        {"layer_types": ["full_attention", "sliding_attention"] * 6},
    ],
)
def test_spec_agrees_with_transformers_config(extra) -> None:
    """transformers' own Gemma3TextConfig interpretation of the same dict is the oracle."""
    from transformers import Gemma3TextConfig

    cfg = {**BASE_CFG, **extra}
    hf = Gemma3TextConfig(**{k: v for k, v in cfg.items() if k != "model_type"})
    spec = spec_from_hf_config(cfg)
    assert [
        ("sliding_attention" if a.is_sliding else "full_attention") for a in spec.layers
    ] == hf.layer_types
    for a, t in zip(spec.layers, hf.layer_types):
        rp = hf.rope_parameters[t]
        assert a.rope_theta == rp["rope_theta"]
        assert a.rope_scaling_factor == (
            rp.get("factor", 1.0) if rp["rope_type"] == "linear" else 1.0
        )
    assert spec_from_hf_config(hf.to_dict()) == spec


def test_spec_multimodal_wrapper_and_softcaps() -> None:
    text = {**BASE_CFG, "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0}
    spec = spec_from_hf_config({"model_type": "gemma3", "text_config": text})
    assert spec.final_logit_softcap == 30.0 and spec.attn_logit_softcap == 50.0
    assert spec.arch == "gemma3_text"


@pytest.mark.parametrize(
    "extra",
    [
        {
            "rope_parameters": {
                "full_attention": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}
            }
        },
        {"layer_types": ["full_attention"] * 3},
        {"use_bidirectional_attention": True},
        {"layer_types": ["sliding_attention"] * 12, "sliding_window": None},
    ],
)
def test_spec_rejects_unsupported(extra) -> None:
    with pytest.raises(ValueError):
        spec_from_hf_config({**BASE_CFG, **extra})


@pytest.mark.parametrize(
    ("gguf", "hf"),
    [
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("output_norm.weight", "model.norm.weight"),
        ("output.weight", "lm_head.weight"),
        ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight"),
        ("blk.7.attn_output.weight", "model.layers.7.self_attn.o_proj.weight"),
        ("blk.3.attn_k_norm.weight", "model.layers.3.self_attn.k_norm.weight"),
        ("blk.3.attn_norm.weight", "model.layers.3.input_layernorm.weight"),
        ("blk.3.post_attention_norm.weight", "model.layers.3.post_attention_layernorm.weight"),
        ("blk.3.ffn_norm.weight", "model.layers.3.pre_feedforward_layernorm.weight"),
        ("blk.3.post_ffw_norm.weight", "model.layers.3.post_feedforward_layernorm.weight"),
        ("blk.17.ffn_down.weight", "model.layers.17.mlp.down_proj.weight"),
    ],
)
def test_hf_tensor_name(gguf: str, hf: str) -> None:
    assert hf_tensor_name(gguf) == hf


def test_hf_tensor_name_unknown() -> None:
    with pytest.raises(ModelLoadError, match="blk.0.attn_qkv.weight"):
        hf_tensor_name("blk.0.attn_qkv.weight")


# ------------------------------------------------------------------- HF dir round trip


def test_tiny_dir_round_trip(tiny_dir: Path) -> None:
    loaded = load_model_dir(tiny_dir)
    spec = loaded.spec
    assert _kinds(spec) == "SSFSS" and spec.window == 8
    assert (spec.vocab_size, spec.hidden_size, spec.num_heads, spec.intermediate_size) == (
        128,
        64,
        4,
        128,
    )
    assert spec.layers[2].kind is AttnKind.FULL and spec.layers[2].rope_theta == 1e6
    assert spec.layers[0].rope_theta == 1e4 and spec.query_pre_attn_scalar == 16.0
    assert spec.eos_token_ids == (TINY_EOS_ID, TINY_EOT_ID) and spec.bos_token_id == TINY_BOS_ID
    ref = load_hf_reference(tiny_dir)
    ref_sd = ref.state_dict()
    assert set(loaded.weights) == set(ref_sd) - {"lm_head.weight"}
    for name, t in loaded.weights.items():
        assert t.dtype == torch.float32
        assert torch.equal(t, ref_sd[name]), name
    norms = [t for n, t in loaded.weights.items() if n.endswith("norm.weight")]
    assert all(t.abs().max() > 0 for t in norms)  # norm weights are random, not zeros
    assert ref.config._attn_implementation == "eager"


def test_tiny_dir_is_deterministic(tmp_path: Path, tiny_dir: Path) -> None:
    again = make_tiny_gemma3_dir(tmp_path / "again")
    a, b = (
        load_file(str(tiny_dir / "model.safetensors")),
        load_file(str(again / "model.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resolve_model_dir_and_errors(tiny_dir: Path, tmp_path: Path) -> None:
    assert resolve_model(str(tiny_dir)) == tiny_dir
    with pytest.raises(ModelLoadError):
        resolve_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        resolve_model(str(tmp_path / "empty"))


def test_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SWAKV_CACHE_DIR", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("SWAKV_CACHE_DIR")
    assert cache_dir() == Path.home() / ".cache" / "swakv"


# ---------------------------------------------------------------------- corrupt files


def _copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_truncated_safetensors_raises(tiny_dir: Path, tmp_path: Path) -> None:
    d = _copy_dir(tiny_dir, tmp_path / "m")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        load_model_dir(d)


def test_garbage_safetensors_raises(tiny_dir: Path, tmp_path: Path) -> None:
    d = _copy_dir(tiny_dir, tmp_path / "m")
    (d / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        load_model_dir(d)


def test_bad_config_raises(tiny_dir: Path, tmp_path: Path) -> None:
    d = _copy_dir(tiny_dir, tmp_path / "m")
    (d / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model_dir(d)
    (d / "config.json").write_text(json.dumps({"model_type": "gemma3_text"}))
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model_dir(d)
    (d / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model_dir(d)


def test_missing_or_misshapen_tensor_raises(tiny_dir: Path, tmp_path: Path) -> None:
    d = _copy_dir(tiny_dir, tmp_path / "m")
    sd = load_file(str(d / "model.safetensors"))
    missing = {k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"}
    save_file(missing, str(d / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="model.layers.1.mlp.up_proj.weight"):
        load_model_dir(d)
    sd["model.norm.weight"] = torch.zeros(3)
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="model.norm.weight"):
        load_model_dir(d)


def test_corrupt_gguf_raises_and_leaves_no_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SWAKV_CACHE_DIR", str(tmp_path / "cache"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOTGGUF" + b"\x00" * 100)
    with pytest.raises(ModelLoadError, match="bad.gguf"):
        resolve_model(str(bad))
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_interrupted_conversion_is_atomic(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A conversion that dies half way leaves neither the target nor temp dirs."""
    monkeypatch.setenv("SWAKV_CACHE_DIR", str(tmp_path / "cache"))
    src = tmp_path / "m.gguf"
    src.write_bytes(b"x")

    def dies(gguf_path: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(loader, "convert_gguf", dies)
    with pytest.raises(KeyboardInterrupt):
        resolve_model(str(src))
    assert list((tmp_path / "cache" / "models").iterdir()) == []

    def works(gguf_path: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        (out_dir / "model.safetensors").write_bytes(b"")

    monkeypatch.setattr(loader, "convert_gguf", works)
    out = resolve_model(str(src))
    assert out.parent == tmp_path / "cache" / "models" and out.name.startswith("m-")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    monkeypatch.setattr(loader, "convert_gguf", dies)
    assert resolve_model(str(src)) == out  # cached: no second conversion


# ------------------------------------------------------------------------- tokenizer


def test_tiny_tokenizer_basics(tiny_dir: Path) -> None:
    tok = load_tokenizer(tiny_dir)
    assert tok.bos_id == TINY_BOS_ID
    assert tok.eos_ids == (TINY_EOS_ID, TINY_EOT_ID)
    assert tok.vocab_size <= 128
    ids = tok.encode("Hello world!")
    assert ids[0] == TINY_BOS_ID and max(ids) < 128
    assert tok.encode("Hello world!", add_bos=False) == ids[1:]
    assert tok.decode(ids) == "Hello world!"
    assert tok.decode(ids, skip_special_tokens=False) == "<bos>Hello world!"
    assert tok.encode("<start_of_turn>user", add_bos=False)[0] == tok.token_to_id("<start_of_turn>")


def test_tiny_chat_template(tiny_dir: Path) -> None:
    tok = load_tokenizer(tiny_dir)
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": " Hi "},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
    ]
    expected = (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
    )
    assert tok.apply_chat_template(msgs) == expected
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == expected.removesuffix(
        "<start_of_turn>model\n"
    )
    with pytest.raises(ChatTemplateError, match="alternate"):
        tok.apply_chat_template([{"role": "assistant", "content": "x"}])


def test_chat_template_is_sandboxed(tiny_dir: Path) -> None:
    tok = load_tokenizer(tiny_dir)
    evil = Tokenizer(
        tok._tok, tok.special_tokens, "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    )
    with pytest.raises(ChatTemplateError):
        evil.apply_chat_template([{"role": "user", "content": "x"}])


def test_tiny_chat_template_matches_transformers(tiny_dir: Path) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tiny_dir), local_files_only=True)
    tok = load_tokenizer(tiny_dir)
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "a b  c"}]
    text = tok.apply_chat_template(msgs)
    assert text == hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert tok.encode(text, add_bos=False) == hf(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize(("vocab", "size"), [(7, 7), (64, 64), (128, 103), (512, 359)])
def test_tiny_vocab_sizes(vocab: int, size: int) -> None:
    from swakv.model.testing import tiny_vocab

    v = tiny_vocab(vocab)
    assert len(v) == size and sorted(v.values()) == list(range(size))


def test_small_vocab_maps_unknown_chars_to_unk(tmp_path: Path) -> None:
    d = make_tiny_gemma3_dir(tmp_path / "v64", vocab=64, num_layers=1, sliding_pattern=["s"])
    tok = load_tokenizer(d)
    ids = tok.encode("ab Z9!", add_bos=False)
    assert max(ids) < 64 and len(ids) == 5  # "9!" does not fit in 64 ids: one fused <unk>
    assert ids[-1] == 3 and tok.decode(ids[:4]) == "ab Z"


def test_lone_surrogate_encodes_as_question_mark(tiny_bytes_dir: Path) -> None:
    tok = load_tokenizer(tiny_bytes_dir)
    assert tok.encode("x\ud800y") == tok.encode("x?y")


def test_unicode_round_trip_with_byte_fallback(tiny_bytes_dir: Path) -> None:
    tok = load_tokenizer(tiny_bytes_dir)
    text = "héllo wörld 😀 日本  \t end"
    ids = tok.encode(text, add_bos=False)
    assert tok.decode(ids) == text


@settings(max_examples=60, deadline=None)
@given(
    text=st.text(
        st.characters(blacklist_categories=("Cs",), blacklist_characters="\ufffd"), max_size=30
    )
)
def test_incremental_decoder_streams_prefixes(tiny_bytes_dir: Path, text: str) -> None:
    """Every emitted piece is clean and the text so far is always a prefix of the result."""
    # special-token strings such as "<unk>" encode to skipped special ids
    assume(not ("<" in text and ">" in text))
    tok = load_tokenizer(tiny_bytes_dir)
    ids = tok.encode(text, add_bos=True)
    dec = tok.incremental_decoder()
    so_far = ""
    for i in ids:
        piece = dec.push(i)
        assert "\ufffd" not in piece
        so_far += piece
        assert text.startswith(so_far)
    assert so_far + dec.flush() == text == tok.decode(ids)


def test_incremental_decoder_holds_partial_utf8(tiny_bytes_dir: Path) -> None:
    tok = load_tokenizer(tiny_bytes_dir)
    ids = tok.encode("a😀b", add_bos=False)
    assert len(ids) == 6  # a, 4 byte tokens, b
    dec = tok.incremental_decoder()
    out = [dec.push(i) for i in ids]
    assert out == ["a", "", "", "", "😀", "b"]
    assert dec.flush() == ""
