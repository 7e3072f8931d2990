"""Reading the small JSON files of a model directory with errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json_object(path: Path, error: type[Exception], what: str = "") -> dict[str, Any]:
    """Parse `path` as a JSON object; raise `error` naming the file if it cannot."""
    label = f"{what} {path}" if what else str(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"cannot read {label}: {e}") from e
    if not isinstance(data, dict):
        raise error(f"{label} is not a JSON object")
    return data
