"""Each example script is self-contained: one file to read and copy. It imports torch,
torchvision, momentum_contrast, the optional tqdm, matplotlib, timm and torchcodec, the
standard library and ``data`` (examples/data.py: the data sources, decoding and loaders),
and no other module of examples/. data.py holds data only: no flags, no training loop."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
from example_runner import EXAMPLES

ALLOWED = {"torch", "torchvision", "momentum_contrast", "tqdm", "matplotlib", "timm"}
ALLOWED |= {"torchcodec", "data"}
# data.py: torch, torchvision, torchcodec and the standard library, without flags
DATA_ALLOWED = ({"torch", "torchvision", "torchcodec"} | set(sys.stdlib_module_names)) - {
    "argparse"
}


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
def test_script_imports_nothing_of_examples_but_data(script: str) -> None:
    others = imported(EXAMPLES / script) - ALLOWED - set(sys.stdlib_module_names)
    assert not others, f"{script} imports {sorted(others)}"


def test_the_check_sees_a_helper_import(tmp_path: Path) -> None:
    script = tmp_path / "script.py"
    script.write_text(
        "import os\nimport torch\nimport data\n\ndef main():\n    from common import setup\n"
    )
    assert imported(script) - ALLOWED - set(sys.stdlib_module_names) == {"common"}
    script.write_text("from shapes import make_shapes\nfrom moco_v2 import build\n")
    assert imported(script) - ALLOWED - set(sys.stdlib_module_names) == {"shapes", "moco_v2"}


def test_data_holds_data_only() -> None:
    """data.py imports no flags (argparse), no script and no training-loop helper (tqdm,
    matplotlib, momentum_contrast), and no function of it takes the scripts' flags."""
    source = EXAMPLES / "data.py"
    assert imported(source) <= DATA_ALLOWED, sorted(imported(source) - DATA_ALLOWED)
    functions = [
        n for n in ast.walk(ast.parse(source.read_text())) if isinstance(n, ast.FunctionDef)
    ]
    assert {f.name for f in functions} >= {"make_shapes", "decode", "datasets", "loader"}
    parameters = {a.arg for f in functions for a in [*f.args.args, *f.args.kwonlyargs]}
    assert "args" not in parameters  # an argparse.Namespace of flags
    assert not (EXAMPLES / "shapes.py").exists()  # the built-in shapes live in data.py
