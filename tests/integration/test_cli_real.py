"""The bundled model as a newcomer meets it (slow: reads the real GGUF): it is a base
model, as its metadata says, and its first-run conversion draws a progress bar on a
terminal, logs its time and writes no generation config (the GGUF has no sampling
metadata)."""

from __future__ import annotations

import io
import logging

import pytest

from swakv.model import loader

pytestmark = pytest.mark.slow


def test_bundled_gguf_is_a_base_model():
    """What DEFAULT_MODEL_IS_BASE and the README's "base model" note rest on."""
    import gguf

    from swakv.model.generation_config import GGUF_SAMPLING_KEYS

    reader = gguf.GGUFReader(str(loader.default_gguf_path()))
    assert loader.gguf_field(reader, "general.name") == "Gemma 3 270m"
    assert loader.gguf_field(reader, "general.finetune") is None  # "it" for instruction-tuned
    assert loader.gguf_field(reader, "tokenizer.chat_template") is None
    assert all(loader.gguf_field(reader, k) is None for k in GGUF_SAMPLING_KEYS)
    assert loader.DEFAULT_MODEL_IS_BASE


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_first_run_conversion_shows_progress_and_logs_its_time(tmp_path, monkeypatch, caplog):
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    gguf_path = loader.default_gguf_path()
    target = tmp_path / "models" / "converted"
    with caplog.at_level(logging.INFO, logger="swakv.model"):
        assert loader._ensure_converted(gguf_path, target) == target
    drawn = terminal.getvalue()
    assert f"converting {gguf_path.name}" in drawn
    assert "237/237" in drawn  # 236 tensors, then the tokenizer
    assert caplog.messages[0] == (f"first use of {gguf_path}: converting it once into "
                                  f"{target} (later starts reuse it)")
    assert caplog.messages[-1].startswith(f"converted {gguf_path.name} in ")
    assert caplog.messages[-1].endswith(" s")
    assert sorted(p.name for p in target.iterdir()) == [
        "chat_template.jinja", "config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json"]
