"""HF config -> ModelSpec for every supported architecture; the shipped configs."""

from __future__ import annotations

import json

import pytest

from swakv.model.spec import UnsupportedArchitecture, kv_spec_from_hf_config, spec_from_hf_config
from swakv.plan.models import CONFIG_DIR, UnknownModel, load_plan_model, shipped_model_names


def kinds(spec) -> str:
    return "".join("S" if a.is_sliding else "F" for a in spec.layers)


# name: (layers, full, sliding, window, kv heads, head dim, context limit)
SHIPPED = {
    "gemma-2-2b": (26, 13, 13, 4096, 4, 256, 8192),
    "gemma-2-9b": (42, 21, 21, 4096, 8, 256, 8192),
    "gemma-2-27b": (46, 23, 23, 4096, 16, 128, 8192),
    "gemma-3-270m": (18, 3, 15, 512, 1, 256, 32768),
    "gemma-3-1b": (26, 4, 22, 512, 1, 256, 32768),
    "gemma-3-4b": (34, 5, 29, 1024, 4, 256, 131072),
    "gemma-3-12b": (48, 8, 40, 1024, 8, 256, 131072),
    "gemma-3-27b": (62, 10, 52, 1024, 16, 128, 131072),
    "gpt-oss-20b": (24, 12, 12, 128, 8, 64, 131072),
    "gpt-oss-120b": (36, 18, 18, 128, 8, 64, 131072),
    "mistral-7b-v0.1": (32, 0, 32, 4096, 8, 128, 32768),
}


def test_shipped_names() -> None:
    assert shipped_model_names() == sorted(SHIPPED)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_config(name) -> None:
    m = load_plan_model(name)
    s = m.spec
    layers, full, sliding, window, kv, hd, limit = SHIPPED[name]
    assert (s.num_layers, len(s.full_layer_ids), len(s.swa_layer_ids)) == (layers, full, sliding)
    assert (s.window, s.max_position_embeddings) == (window, limit)
    assert {(a.num_kv_heads, a.head_dim) for a in s.layers} == {(kv, hd)}
    assert "config.json" in m.source  # every number says where it came from


def test_layer_patterns() -> None:
    assert kinds(load_plan_model("gemma-3-27b").spec)[:12] == "SSSSSFSSSSSF"
    assert kinds(load_plan_model("gemma-2-2b").spec)[:4] == "SFSF"  # layer 0 slides
    assert kinds(load_plan_model("gpt-oss-120b").spec)[:4] == "SFSF"
    assert kinds(load_plan_model("mistral-7b-v0.1").spec) == "S" * 32


def test_notes() -> None:
    assert any("attention sinks" in n and "no KV" in n
               for n in load_plan_model("gpt-oss-120b").notes)
    assert any("no full layers" in n for n in load_plan_model("mistral-7b-v0.1").notes)
    assert load_plan_model("gemma-3-27b").notes == ()


def test_gpt_oss_sinks_said_once(capsys) -> None:
    """The attention-sink note is the only place `swakv plan` explains sinks: the
    config's source line says where the numbers come from and nothing more."""
    from swakv.cli import main

    assert "sink" not in load_plan_model("gpt-oss-20b").source.lower()
    assert main(["plan", "--model", "gpt-oss-20b", "--kv-memory", "60GiB"]) == 0
    out = capsys.readouterr().out
    assert out.lower().count("attention sink") == 1 and out.count("no KV") == 1
    assert "note: attention sinks: one learned logit per query head (64," in out


@pytest.mark.parametrize(("name", "cls", "n"), [
    ("gpt-oss-120b", "GptOssConfig", 36), ("gemma-2-9b", "Gemma2Config", 42)])
def test_layer_types_agree_with_transformers(name, cls, n) -> None:
    """transformers' own config class derives the layer types we derive."""
    import transformers

    hf = getattr(transformers, cls)(num_hidden_layers=n)
    spec = load_plan_model(name).spec
    assert ["sliding_attention" if a.is_sliding else "full_attention"
            for a in spec.layers] == hf.layer_types


def test_generic_configs() -> None:
    base = {"vocab_size": 100, "hidden_size": 64, "num_attention_heads": 4,
            "num_hidden_layers": 4, "max_position_embeddings": 2048}
    llama = kv_spec_from_hf_config({**base, "model_type": "llama", "num_key_value_heads": 2})
    assert kinds(llama) == "FFFF" and llama.window is None
    assert {(a.num_kv_heads, a.head_dim) for a in llama.layers} == {(2, 16)}
    qwen = kv_spec_from_hf_config({**base, "model_type": "qwen2", "sliding_window": 32,
                                   "use_sliding_window": True, "max_window_layers": 2})
    assert kinds(qwen) == "FFSS" and qwen.window == 32
    qwen_off = kv_spec_from_hf_config({**base, "model_type": "qwen2", "sliding_window": 32,
                                       "use_sliding_window": False})
    assert kinds(qwen_off) == "FFFF"
    explicit = kv_spec_from_hf_config({**base, "model_type": "cohere2", "sliding_window": 8,
                                       "layer_types": ["sliding_attention"] * 3
                                       + ["full_attention"]})
    assert kinds(explicit) == "SSSF"
    wrapped = kv_spec_from_hf_config({"model_type": "mistral3", "text_config": {
        **base, "model_type": "mistral", "sliding_window": 16}})
    assert kinds(wrapped) == "SSSS" and wrapped.arch == "mistral"
    with pytest.raises(ValueError):
        kv_spec_from_hf_config({**base, "model_type": "llama4",
                                "layer_types": ["chunked_attention"] * 4})


def test_serving_spec_is_gemma3_only() -> None:
    cfg = json.loads(CONFIG_DIR.joinpath("gpt-oss-20b.json").read_text())
    with pytest.raises(UnsupportedArchitecture, match="Gemma 3 only"):
        spec_from_hf_config(cfg)
    # Gemma 3 configs give the same spec through both entry points
    g3 = json.loads(CONFIG_DIR.joinpath("gemma-3-27b.json").read_text())
    assert kv_spec_from_hf_config(g3) == spec_from_hf_config(g3)


def test_load_from_path(tmp_path) -> None:
    cfg = {"model_type": "mistral", "vocab_size": 10, "hidden_size": 8, "num_attention_heads": 2,
           "num_hidden_layers": 3, "sliding_window": 64, "max_position_embeddings": 512}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    m = load_plan_model(str(tmp_path))
    assert m.name == tmp_path.name and kinds(m.spec) == "SSS" and m.spec.window == 64
    assert load_plan_model(str(tmp_path / "config.json")).spec == m.spec
    with pytest.raises(UnknownModel):
        load_plan_model(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(UnknownModel, match="not a JSON object"):
        load_plan_model(str(tmp_path / "bad.json"))
    (tmp_path / "partial.json").write_text(json.dumps({"model_type": "mistral"}))
    with pytest.raises(UnknownModel, match="not a supported model config"):
        load_plan_model(str(tmp_path / "partial.json"))
