"""Model configs for planning: shipped public configs, or any Hugging Face config.json.

`configs/NAME.json` hold the KV-relevant fields of public models' `config.json` (and a
`source` saying where each came from), so `swakv plan` works offline. `load_plan_model`
takes one of those names, or a path to a `config.json` (or a directory holding one),
and returns its `ModelSpec` (`kv_spec_from_hf_config`) with notes on what the planner
assumes about it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from swakv.config import ModelSpec
from swakv.model.spec import kv_spec_from_hf_config

CONFIG_DIR = Path(__file__).with_name("configs")


class UnknownModel(ValueError):
    """Neither a shipped config name nor a readable config.json."""


@dataclass(frozen=True)
class PlanModel:
    name: str
    spec: ModelSpec
    source: str  # where the numbers come from
    notes: tuple[str, ...]

    @property
    def num_full_layers(self) -> int:
        return len(self.spec.full_layer_ids)

    @property
    def num_swa_layers(self) -> int:
        return len(self.spec.swa_layer_ids)


def shipped_model_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def load_plan_model(name_or_path: str) -> PlanModel:
    """A shipped config by name (e.g. 'gemma-3-27b'), else a config.json path or its dir."""
    shipped = CONFIG_DIR / f"{name_or_path.lower()}.json"
    if "/" not in name_or_path and shipped.is_file():
        cfg = _read(shipped)
        return _plan_model(cfg.get("name", shipped.stem), cfg, str(cfg.get("source", shipped)))
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise UnknownModel(f"{name_or_path!r} is neither a shipped model config "
                           f"({', '.join(shipped_model_names())}) nor a config.json file")
    name = path.parent.name if path.name == "config.json" else path.stem
    return _plan_model(name, _read(path), str(path))


def _read(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UnknownModel(f"cannot read {path}: {e}") from e
    if not isinstance(cfg, dict):
        raise UnknownModel(f"{path}: not a JSON object")
    return cfg


def _plan_model(name: str, cfg: dict[str, Any], source: str) -> PlanModel:
    try:
        spec = kv_spec_from_hf_config(cfg)
    except (KeyError, TypeError, ValueError) as e:
        raise UnknownModel(f"{source}: not a supported model config: {e}") from e
    return PlanModel(name, spec, source, model_notes(spec))


def model_notes(spec: ModelSpec) -> tuple[str, ...]:
    """What the planner assumes beyond the layer kinds (the shipped configs' `source`
    says only where the numbers come from; these notes say what they mean for KV)."""
    notes = []
    if spec.arch == "gpt_oss":
        notes.append(f"attention sinks: one learned logit per query head ({spec.num_heads}, "
                     "GptOssAttention.sinks) added to the softmax denominator; they hold no "
                     "KV, so no token positions are pinned")
    if not spec.swa_layer_ids:
        notes.append("no sliding layers: the SWA pool has zero bytes per token and every "
                     "layer keeps every token")
    if not spec.full_layer_ids:
        notes.append("no full layers: the full pool has zero bytes per token (it only names "
                     "token slots); the SWA pool alone bounds capacity")
    return tuple(notes)
