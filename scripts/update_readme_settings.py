"""Rewrite README.md's settings table from the config dataclasses' help text.

    .venv/bin/python scripts/update_readme_settings.py
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from swakv.cli import settings_markdown

START, END = "<!-- settings:start -->", "<!-- settings:end -->"


def main() -> int:
    readme = Path(__file__).resolve().parents[1] / "README.md"
    text = readme.read_text()
    block = f"{START}\n{settings_markdown()}\n{END}"
    new, count = re.subn(re.escape(START) + r".*?" + re.escape(END), lambda _: block, text,
                         flags=re.S)
    if count != 1:
        print(f"{readme}: expected one {START} ... {END} block", file=sys.stderr)
        return 1
    if new != text:
        readme.write_text(new)
        print(f"updated {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
