"""A model's default sampling values (`generation_config.json`), applied to requests
that leave them unset, like vLLM does by default.

Precedence for each of SAMPLING_KEYS: the request's own value, else the model's
generation config, else the caller's fallback (OpenAI's defaults on the server,
greedy for `swakv generate`). Only keys the file sets count; a file with
`"do_sample": false` and no temperature means greedy (Hugging Face's reading).

GGUF files carry the same values as `general.sampling.*` metadata (llama.cpp);
`generation_config_from_gguf` maps them and the GGUF converter writes them to the
converted directory's `generation_config.json`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from swakv.model.jsonfile import read_json_object
from swakv.sampling_params import InvalidSamplingParams, SamplingParams

GENERATION_CONFIG_FILE = "generation_config.json"
SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")
GGUF_SAMPLING_KEYS = {  # llama.cpp metadata key -> generation_config.json key
    "general.sampling.temp": "temperature",
    "general.sampling.top_k": "top_k",
    "general.sampling.top_p": "top_p",
    "general.sampling.min_p": "min_p",
    "general.sampling.penalty_repeat": "repetition_penalty",
}


class GenerationConfigError(ValueError):
    """A generation config file is missing (when named explicitly), unreadable or holds
    out-of-range sampling values."""


@dataclass(frozen=True)
class GenerationConfig:
    """The model's default sampling values; None: the model does not set that one."""

    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    source: str = ""  # the file the values came from ("": no generation config)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str) -> GenerationConfig:
        """Read SAMPLING_KEYS from a generation_config.json object (other keys ignored)."""
        values: dict[str, Any] = {}
        for key in SAMPLING_KEYS:
            value = data.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise GenerationConfigError(f"{source}: {key} must be a number, got {value!r}")
            if key == "top_k":
                if value != int(value):
                    raise GenerationConfigError(f"{source}: top_k must be an integer, "
                                                f"got {value!r}")
                value = int(value)
            values[key] = value if key == "top_k" else float(value)
        if data.get("do_sample") is False and "temperature" not in values:
            values["temperature"] = 0.0
        config = cls(**values, source=source)
        try:
            SamplingParams(**config.defaults())
        except InvalidSamplingParams as e:
            raise GenerationConfigError(f"{source}: {e}") from None
        return config

    def defaults(self) -> dict[str, Any]:
        """The values the model sets, e.g. {"temperature": 0.7, "top_k": 64}."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name in SAMPLING_KEYS and getattr(self, f.name) is not None}

    def apply(self, given: Mapping[str, Any], fallback: Mapping[str, Any] | None = None
              ) -> dict[str, Any]:
        """SamplingParams kwargs: `given` (None values dropped) over the model's values
        over `fallback`. Keys outside SAMPLING_KEYS pass through from `given`."""
        merged = dict(fallback or {})
        merged.update(self.defaults())
        merged.update({k: v for k, v in given.items() if v is not None})
        return merged

    def describe(self) -> str:
        values = ", ".join(f"{k}={v}" for k, v in self.defaults().items())
        return f"{values or 'no sampling values'} (from {self.source})" if self.source \
            else "none"


def load_generation_config(setting: str, model_dir: str | Path) -> GenerationConfig:
    """The generation config `--generation-config SETTING` selects for a model dir.

    "auto": `model_dir/generation_config.json` if present, else none; "none": none;
    anything else: a directory holding generation_config.json, or the file itself
    (it must exist).
    """
    if setting == "none":
        return GenerationConfig()
    if setting == "auto":
        path = Path(model_dir) / GENERATION_CONFIG_FILE
        if not path.is_file():
            return GenerationConfig()
    else:
        path = Path(setting).expanduser()
        if path.is_dir():
            path = path / GENERATION_CONFIG_FILE
        if not path.is_file():
            raise GenerationConfigError(
                f"--generation-config {setting!r}: no such file (expected auto, none, or a "
                f"directory or file with a {GENERATION_CONFIG_FILE})")
    return GenerationConfig.from_dict(read_json_object(path, GenerationConfigError), str(path))


def generation_config_from_gguf(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """generation_config.json entries from GGUF `general.sampling.*` metadata ({} if none).

    `metadata` maps GGUF keys to their values, e.g. {"general.sampling.temp": 0.7}.
    """
    out: dict[str, Any] = {}
    for gguf_key, key in GGUF_SAMPLING_KEYS.items():
        value = metadata.get(gguf_key)
        if value is not None:  # GGUF stores f32: 0.949999988 -> 0.95 (shortest repr)
            out[key] = int(value) if key == "top_k" else float(str(np.float32(value)))
    return out
