"""Each example script is self-contained: one file to read and copy. It imports torch,
torchvision, momentum_contrast, the optional tqdm, matplotlib, timm and torchcodec, the
standard library and the built-in ``shapes`` data, and no other helper module of examples/."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
from example_runner import EXAMPLES

ALLOWED = {"torch", "torchvision", "momentum_contrast", "tqdm", "matplotlib", "timm"}
ALLOWED |= {"torchcodec", "shapes"}


def imported(script: Path) -> set[str]:
    """The top-level names of every module ``script`` imports, at any depth of its code."""
    names = set()
    for node in ast.walk(ast.parse(script.read_text(), str(script))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{script.name}: a relative import"
            names.add((node.module or "").split(".")[0])
    return names


@pytest.mark.parametrize("script", ["moco_v2.py", "moco_v3.py", "linear_eval.py"])
def test_script_imports_nothing_of_examples_but_shapes(script: str) -> None:
    others = imported(EXAMPLES / script) - ALLOWED - set(sys.stdlib_module_names)
    assert not others, f"{script} imports {sorted(others)}"


def test_the_check_sees_a_helper_import(tmp_path: Path) -> None:
    script = tmp_path / "script.py"
    script.write_text("import os\nimport torch\n\ndef main():\n    from common import setup\n")
    assert imported(script) - ALLOWED - set(sys.stdlib_module_names) == {"common"}
