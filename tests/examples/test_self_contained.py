"""What the example scripts import of examples/: ``data`` (examples/data.py: the data
sources, decoding and loaders), ``harness`` (examples/harness.py: what a run needs besides
MoCo: flag helpers, set-up, backbones, each step's views), ``monitoring``
(examples/monitoring.py: step log, metrics.png, kNN monitor) and ``checkpoints``
(examples/checkpoints.py: saving, resuming, random states), and no other module of it;
otherwise torch, torchvision, momentum_contrast, the optional tqdm, matplotlib, timm and
torchcodec, and the standard library. data.py holds data only: no flags, no training loop.
The helpers parse no flags of their own (they serve the scripts' parsers), none of them
imports a script, and they build on each other in one direction: monitoring, then harness,
then checkpoints."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest
from example_runner import EXAMPLES

ALLOWED = {"torch", "torchvision", "momentum_contrast", "tqdm", "matplotlib", "timm"}
ALLOWED |= {"torchcodec", "data", "harness", "monitoring", "checkpoints"}
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
def test_script_imports_nothing_of_examples_but_its_helpers(script: str) -> None:
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


@pytest.mark.parametrize(
    ("helper", "defines"),
    [
        ("monitoring.py", {"StepLog", "KnnMonitor"}),
        ("harness.py", {"setup", "check_flags"}),
        ("checkpoints.py", {"load_resume"}),
    ],
)
def test_helpers_import_no_script_and_parse_no_flags_of_their_own(
    helper: str, defines: set[str]
) -> None:
    """The helpers import data and the scripts' own dependencies, no script; they build no
    parser and read no command line (the scripts do: ``parse_flags`` takes their parser and
    their ``argv``), and none is a script itself (no ``main``)."""
    source = EXAMPLES / helper
    others = imported(source) - ALLOWED - set(sys.stdlib_module_names)
    assert not others, f"{helper} imports {sorted(others)}"
    assert not imported(source) & SCRIPTS
    assert not imported(EXAMPLES / "monitoring.py") & {"harness", "checkpoints"}  # no cycle
    assert "checkpoints" not in imported(EXAMPLES / "harness.py")
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
    assert "main" not in names and defines <= names
    assert "__main__" not in source.read_text()
    assert not imported(EXAMPLES / "data.py") & (SCRIPTS | {"harness", "monitoring", "checkpoints"})


def test_readme_names_every_helper_a_script_needs_and_their_length() -> None:
    """examples/README.md says which files a copied script needs (the helpers it imports,
    and theirs) and how many lines a reader of a script and its helpers reads."""
    text = " ".join((EXAMPLES / "README.md").read_text().split())
    helpers = {"data", "harness", "monitoring", "checkpoints"}

    def needed(script: str) -> set[str]:
        todo, seen = [script], set[str]()
        while todo:
            found = imported(EXAMPLES / f"{todo.pop()}.py") & helpers
            todo += found - seen
            seen |= found
        return seen

    assert needed("moco_v2") == needed("moco_v3") == helpers
    assert "copy it with these four" in text
    others = sorted(needed("linear_eval") - {"data"})
    listed = ", ".join(f"`{h}.py`" for h in others)
    assert f"(`linear_eval.py` needs {listed} and `data.py`)" in text
    lines = {name: len((EXAMPLES / f"{name}.py").read_text().splitlines()) for name in helpers}
    shared = lines["harness"] + lines["monitoring"] + lines["checkpoints"]
    assert f"The helpers are {shared} lines" in text
    for script in ("moco_v2", "moco_v3"):
        own = len((EXAMPLES / f"{script}.py").read_text().splitlines())
        said = re.search(rf"`{script}\.py` \({own}\)[^0-9]* about ([0-9,]+)", text)
        assert said, f"{script}.py: its length ({own}) is not in examples/README.md"
        total = int(said.group(1).replace(",", ""))
        assert abs(total - (own + shared)) <= 10, (script, total, own + shared)
