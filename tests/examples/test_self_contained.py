"""What the example scripts import of examples/: ``data`` (examples/data.py: the data
sources, decoding and loaders) and ``harness`` (examples/harness.py: what a run needs besides
MoCo: flag helpers, set-up, random states, backbones, step log, kNN monitor, checkpoints),
and no other module of it; otherwise torch, torchvision, momentum_contrast, the optional
tqdm, matplotlib, timm and torchcodec, and the standard library. data.py holds data only:
no flags, no training loop. harness.py parses no flags of its own (its flag helpers serve the
scripts' parsers), and neither of the two imports a script."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
from example_runner import EXAMPLES

ALLOWED = {"torch", "torchvision", "momentum_contrast", "tqdm", "matplotlib", "timm"}
ALLOWED |= {"torchcodec", "data", "harness"}
SCRIPTS = {"moco_v1", "moco_v2", "moco_v3", "linear_eval"}
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
def test_script_imports_nothing_of_examples_but_data_and_harness(script: str) -> None:
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
    matplotlib, momentum_contrast, harness), and no function of it takes the scripts' flags."""
    source = EXAMPLES / "data.py"
    assert imported(source) <= DATA_ALLOWED, sorted(imported(source) - DATA_ALLOWED)
    functions = [
        n for n in ast.walk(ast.parse(source.read_text())) if isinstance(n, ast.FunctionDef)
    ]
    assert {f.name for f in functions} >= {"make_shapes", "decode", "datasets", "loader"}
    parameters = {a.arg for f in functions for a in [*f.args.args, *f.args.kwonlyargs]}
    assert "args" not in parameters  # an argparse.Namespace of flags
    assert not (EXAMPLES / "shapes.py").exists()  # the built-in shapes live in data.py


def test_harness_imports_no_script_and_parses_no_flags_of_its_own() -> None:
    """harness.py imports data and the scripts' own dependencies, no script; it builds no
    parser and reads no command line (the scripts do: ``parse_flags`` takes their parser and
    their ``argv``), and it is no script itself (no ``main``)."""
    source = EXAMPLES / "harness.py"
    others = imported(source) - ALLOWED - set(sys.stdlib_module_names)
    assert not others, f"harness.py imports {sorted(others)}"
    assert not imported(source) & SCRIPTS
    tree = ast.parse(source.read_text())
    calls = {
        node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
    }
    assert not calls & {"ArgumentParser", "OneLineParser"}  # the scripts build the parsers
    attributes = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert "argv" not in attributes  # no sys.argv: the scripts pass theirs
    names = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    assert "main" not in names and {"setup", "StepLog", "load_resume"} <= names
    assert "__main__" not in source.read_text()
    assert not imported(EXAMPLES / "data.py") & (SCRIPTS | {"harness"})
