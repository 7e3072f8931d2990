"""swakv: a serving engine for hybrid sliding-window-attention models.

`swakv.LLM` and `swakv.SamplingParams` are the in-process API (imported lazily so
that `import swakv` stays light).
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str):
    if name == "LLM":
        from swakv.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from swakv.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'swakv' has no attribute {name!r}")
