"""The code of docs/guides/lightning.md for the Lightning tests: the guide's blocks that
define the LightningModules, executed as they are written there (not copied here)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "guides" / "lightning.md"
_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)


def python_blocks() -> list[str]:
    """Every ```python block of the guide, in order."""
    return [m.group(2) for m in _FENCE.finditer(GUIDE.read_text()) if m.group(1) == "python"]


def block_defining(name: str) -> str:
    """The one block of the guide that defines ``class <name>(``."""
    found = [code for code in python_blocks() if f"class {name}(" in code]
    assert len(found) == 1, f"{GUIDE.name}: {len(found)} blocks define class {name}"
    return found[0]


def load(*names: str) -> dict[str, Any]:
    """Execute the blocks defining ``names`` (in that order) in one namespace."""
    namespace: dict[str, Any] = {"__name__": "lightning_guide"}
    for name in names:
        code = block_defining(name)
        exec(compile(code, f"{GUIDE.name}: class {name}", "exec"), namespace)
    return namespace
