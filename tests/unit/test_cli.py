"""The CLI builds its flags from the config dataclasses; README's table is generated."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from swakv.cli import build_parser, config_from_args, main, parse_number, settings_markdown
from swakv.config import EngineConfig, ServerConfig

README = Path(__file__).resolve().parents[2] / "README.md"


def serve_args(*argv: str):
    return build_parser().parse_args(["serve", *argv])


def test_every_config_field_is_a_serve_flag_with_its_help():
    help_text = re.sub(r"\s+", " ", build_parser()._subparsers._group_actions[0]
                       .choices["serve"].format_help())
    for cls in (ServerConfig, EngineConfig):
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            assert flag in help_text, flag
            first_words = " ".join(f.metadata["help"].split()[:4])
            assert first_words in help_text, (flag, first_words)


def test_defaults_come_from_the_dataclasses():
    ns = serve_args()
    assert config_from_args(ns, ServerConfig) == ServerConfig()
    assert config_from_args(ns, EngineConfig) == EngineConfig()
    assert ServerConfig().host == "127.0.0.1"


def test_flags_parse_into_configs():
    ns = serve_args("--model", "/m", "--port", "9001", "--kv-memory", "2GiB", "--page-size", "8",
                    "--chunk-size", "128", "--api-key", "k", "--no-enable-prefix-cache",
                    "--swa-fraction", "0.3", "--max-context", "1024")
    s, e = config_from_args(ns, ServerConfig), config_from_args(ns, EngineConfig)
    assert (s.model, s.port, s.api_key) == ("/m", 9001, "k")
    assert e.kv_memory == 2 * 2**30 and e.page_size == 8 and e.chunk_size == 128
    assert e.enable_prefix_cache is False and e.swa_fraction == 0.3 and e.max_context == 1024


@pytest.mark.parametrize("text,value", [
    ("0.25", 0.25), ("2e9", 2e9), ("512M", 512e6), ("512MiB", 512 * 2**20), ("2GiB", 2 * 2**30),
    ("1.5g", 1.5e9), ("64k", 64e3), ("3KiB", 3072),
])
def test_parse_number(text, value):
    assert parse_number(text) == value


def test_bad_values_exit_with_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--page-size", "0"])
    assert e.value.code == 2
    assert "page_size must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--kv-memory", "lots"])


def test_readme_settings_table_is_generated():
    """Regenerate with `python scripts/update_readme_settings.py`."""
    assert settings_markdown() in README.read_text()


def test_readme_has_the_two_setup_commands():
    text = README.read_text()
    assert "make serve" in text and "make test" in text


def test_generate_streams_the_in_process_completion(tmp_path, capsys):
    from swakv.engine.llm import LLM
    from swakv.model.testing import make_tiny_gemma3_dir
    from swakv.sampling_params import SamplingParams

    path = str(make_tiny_gemma3_dir(tmp_path / "tiny", num_layers=3, vocab=128))
    flags = ["--model", path, "--kv-memory", "8MiB", "--page-size", "4"]
    assert main(["generate", "Hello there", *flags, "--max-tokens", "8"]) == 0
    printed = capsys.readouterr().out
    ref = LLM(path, kv_memory=8 << 20, page_size=4).generate(
        ["Hello there"], SamplingParams(temperature=0, max_tokens=8))[0]
    assert printed == ref.text + "\n"
