"""The CLI builds its flags from the config dataclasses; README's table is generated."""

from __future__ import annotations

import argparse
import dataclasses
import io
import re
from pathlib import Path

import pytest

from swakv.cli import (
    build_parser,
    config_from_args,
    main,
    parse_number,
    serve_configs,
    settings_markdown,
    subparser,
)
from swakv.config import EngineConfig, ServerConfig

README = Path(__file__).resolve().parents[2] / "README.md"


def serve_args(*argv: str):
    return build_parser().parse_args(["serve", *argv])


def test_every_config_field_is_a_serve_flag_with_its_help_and_aliases():
    help_text = re.sub(r"\s+", " ", subparser(build_parser(), "serve").format_help())
    for cls in (ServerConfig, EngineConfig):
        for f in dataclasses.fields(cls):
            for flag in ["--" + f.name.replace("_", "-"), *f.metadata["aliases"]]:
                assert flag in help_text, flag
            first_words = " ".join(f.metadata["help"].split()[:4])
            assert first_words in help_text, (f.name, first_words)


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


def test_top_level_help_names_every_subcommand():
    parser = build_parser()
    names = next(a for a in parser._actions
                 if isinstance(a, argparse._SubParsersAction)).choices
    assert set(names) == {"serve", "router", "generate", "bench", "settings", "plan", "simulate"}
    for name in names:
        assert name in parser.description
    # README and docs/architecture.md name each of them as a `swakv NAME` command
    docs = README.read_text() + (README.parent / "docs" / "architecture.md").read_text()
    for name in names:
        command = "swakv bench serve" if name == "bench" else f"swakv {name}"
        assert command in docs, name


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


# ---- aliases users know from vLLM / SGLang / llama-server --------------------------

ALIASES = {  # alias -> (swakv flag, value given to both)
    "--max-model-len": ("--max-context", "2048"),
    "--context-length": ("--max-context", "2048"),
    "--max-num-seqs": ("--max-running-requests", "7"),
    "--parallel": ("--max-running-requests", "7"),
    "--max-num-batched-tokens": ("--chunk-size", "256"),
    "--chunked-prefill-size": ("--chunk-size", "256"),
    "--enable-prefix-caching": ("--enable-prefix-cache", None),
    "--no-enable-prefix-caching": ("--no-enable-prefix-cache", None),
    "--served-model-name": ("--served-model-name", "mine"),
    "--alias": ("--served-model-name", "mine"),
    "--model-path": ("--model", "/some/model"),
    "--seed": ("--seed", "1234"),
    "--chat-template": ("--chat-template", "/t.jinja"),
    "--chat-template-file": ("--chat-template", "/t.jinja"),
    "--threads": ("--num-threads", "3"),
}


def _configs(*argv: str):
    return serve_configs(serve_args(*argv))


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_alias_sets_the_same_setting_as_its_swakv_flag(alias):
    flag, value = ALIASES[alias]
    via_alias = _configs(alias, *([value] if value else []))
    via_flag = _configs(flag, *([value] if value else []))
    assert via_alias == via_flag
    assert via_alias != _configs() or alias == "--enable-prefix-caching"  # it changed something


def test_every_declared_alias_is_tested():
    declared = {a for cls in (ServerConfig, EngineConfig) for f in dataclasses.fields(cls)
                for a in f.metadata["aliases"]}
    assert declared <= set(ALIASES)


def test_model_is_also_positional():
    assert _configs("/models/m.gguf")[0].model == "/models/m.gguf"
    assert _configs("/models/m.gguf", "--model", "/models/m.gguf")[0].model == "/models/m.gguf"
    assert _configs()[0].model == "default"


def test_model_given_twice_differently_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "/a", "--model", "/b"])
    assert e.value.code == 2
    assert "model given twice" in capsys.readouterr().err


# ---- --kv-memory ------------------------------------------------------------------

@pytest.mark.parametrize("text,value", [
    ("4GiB", 4 * 2**30), ("512MiB", 512 * 2**20), ("512M", 512e6), ("2e9", 2e9),
    ("1048576", 2**20), ("0.25", 0.25), ("1.0", 1.0), (".5", 0.5),
])
def test_kv_memory_accepted_forms(text, value):
    assert _configs("--kv-memory", text)[1].kv_memory == value


@pytest.mark.parametrize("text", ["1", "2", "0", "4096", "1.5", "0.0", "100KiB", "lots", "-1"])
def test_kv_memory_refused_forms_show_the_accepted_ones(text, capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--kv-memory", text])
    assert e.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"--kv-memory {text!r}" in err
    assert "a size like 4GiB, 512MiB or 2e9 (bytes, at least 1 MiB), or a fraction of " \
           "currently available RAM written with a decimal point like 0.25" in err


def test_kv_memory_in_python_is_bytes_or_a_fraction():
    assert EngineConfig(kv_memory=1).kv_memory == 1  # a fraction: all available RAM
    with pytest.raises(ValueError, match="kv_memory must be"):
        EngineConfig(kv_memory=2)  # two bytes


# ---- a model that cannot be loaded: one line, exit 1 ------------------------------

def _stderr_lines(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("kind", ["missing", "not_gguf", "no_config", "corrupt_gguf",
                                  "bad_config"])
def test_unusable_model_exits_1_with_one_line(tmp_path, monkeypatch, capsys, kind):
    monkeypatch.setenv("SWAKV_CACHE_DIR", str(tmp_path / "cache"))
    target = tmp_path / "model"
    if kind == "not_gguf":
        target = tmp_path / "weights.bin"
        target.write_bytes(b"x" * 100)
    elif kind == "no_config":
        target.mkdir()
        (target / "model.safetensors").write_bytes(b"")
    elif kind == "corrupt_gguf":
        target = tmp_path / "broken.gguf"
        target.write_bytes(b"GGUF" + b"\0" * 60)
    elif kind == "bad_config":
        target.mkdir()
        (target / "config.json").write_text("{}")
        (target / "model.safetensors").write_bytes(b"not safetensors")
    assert main(["serve", str(target), "--log-level", "error", "--kv-memory", "16MiB"]) == 1
    lines = _stderr_lines(capsys)
    assert len(lines) == 1, lines
    assert lines[0].startswith("swakv serve: error: ")
    expected = {"missing": "no such file or directory", "not_gguf": "is not a .gguf file",
                "no_config": "has no config.json", "corrupt_gguf": "cannot read GGUF file",
                "bad_config": "invalid model config"}[kind]
    assert expected in lines[0]
    assert str(target) in lines[0]


def test_missing_model_process_prints_one_line_and_no_traceback(tmp_path):
    """The real command line, as a new user runs it."""
    import subprocess
    import sys

    missing = tmp_path / "nope"
    out = subprocess.run([sys.executable, "-m", "swakv.cli", "serve", str(missing)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        f"swakv serve: error: model {str(missing)!r}: no such file or directory "
        "(expected 'default' or 'gemma3-270m', a .gguf file or a model directory with "
        "config.json and *.safetensors)"]


def test_missing_model_in_generate_exits_1_with_one_line(tmp_path, capsys):
    assert main(["generate", "hi", "--model", str(tmp_path / "nope")]) == 1
    lines = _stderr_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("swakv generate: error: model ")


def test_bad_chat_template_and_generation_config_files_exit_1(tmp_path, capsys):
    from swakv.model.testing import make_tiny_gemma3_dir

    path = str(make_tiny_gemma3_dir(tmp_path / "tiny", num_layers=3))
    capsys.readouterr()
    flags = ["--log-level", "error", "--kv-memory", "16MiB"]
    assert main(["serve", path, *flags, "--chat-template", str(tmp_path / "none.jinja")]) == 1
    lines = _stderr_lines(capsys)
    assert len(lines) == 1 and "no such file" in lines[0], lines
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for %}")
    assert main(["serve", path, *flags, "--chat-template", str(bad)]) == 1
    lines = _stderr_lines(capsys)
    assert len(lines) == 1 and "invalid chat template" in lines[0], lines
    assert main(["serve", path, *flags, "--generation-config", str(tmp_path)]) == 1
    lines = _stderr_lines(capsys)
    assert len(lines) == 1 and "--generation-config" in lines[0], lines


# ---- first run: the GGUF conversion's progress bar and log ---------------------------

class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_a_terminal(monkeypatch):
    from swakv.model import loader

    quiet = io.StringIO()
    monkeypatch.setattr("sys.stderr", quiet)
    with loader._progress(3, "converting x") as bar:
        bar.update(3)
    assert quiet.getvalue() == ""
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    with loader._progress(3, "converting x") as bar:
        bar.update(3)
    assert "\rconverting x:   0%|          | 0/3 " in terminal.getvalue()


def test_conversion_logs_its_start_and_time(monkeypatch, tmp_path, caplog):
    import logging

    from swakv.model import loader

    monkeypatch.setenv("SWAKV_CACHE_DIR", str(tmp_path / "cache"))
    src = tmp_path / "m.gguf"
    src.write_bytes(b"x")

    def convert(gguf_path, out_dir):
        (out_dir / "config.json").write_text("{}")
        (out_dir / "model.safetensors").write_bytes(b"")

    monkeypatch.setattr(loader, "convert_gguf", convert)
    with caplog.at_level(logging.INFO, logger="swakv.model"):
        out = loader.resolve_model(str(src))
        loader.resolve_model(str(src))  # cached: logs nothing more
    assert caplog.messages[0] == f"first use of {src}: converting it once into {out} " \
                                 "(later starts reuse it)"
    assert re.fullmatch(r"converted m\.gguf in \d+\.\d s", caplog.messages[1])
    assert len(caplog.messages) == 2
