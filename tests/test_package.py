"""Packaging: the public names, the version, typing marker and runtime dependencies."""

from __future__ import annotations

import importlib.metadata
import pathlib
import re
import subprocess
import sys

import pytest

import momentum_contrast

PUBLIC = {
    "MomentumEncoder",
    "cosine_momentum",
    "KeyQueue",
    "info_nce",
    "symmetric_contrastive_loss",
    "InfoNCE",
    "SymmetricContrastiveLoss",
    "build_mlp",
    "moco_v1_head",
    "moco_v2_head",
    "moco_v3_projector",
    "moco_v3_predictor",
    "strip_classifier",
}


def test_public_names_import_from_the_top_level() -> None:
    assert set(momentum_contrast.__all__) == PUBLIC | {"__version__"}
    for name in PUBLIC:
        doc = getattr(momentum_contrast, name).__doc__ or ""
        assert "Examples:" in doc and ">>> " in doc, f"{name} has no runnable example"


def test_version_matches_metadata() -> None:
    assert momentum_contrast.__version__ == "0.3.0"
    assert importlib.metadata.version("momentum-contrast") == momentum_contrast.__version__


def test_py_typed_marker_ships() -> None:
    assert (pathlib.Path(momentum_contrast.__file__).parent / "py.typed").is_file()


def test_runtime_dependencies_are_torch_einops_typing_extensions() -> None:
    requires = importlib.metadata.requires("momentum-contrast") or []
    runtime = {re.split(r"[<>=!~ ;\[]", r)[0].lower() for r in requires if "extra ==" not in r}
    assert runtime == {"torch", "einops", "typing-extensions"}


def test_import_loads_nothing_beyond_torch() -> None:
    code = (
        "import sys, torch; before = set(sys.modules); import momentum_contrast; "
        "print(sorted({m.split('.')[0] for m in set(sys.modules) - before}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    new = set(eval(out.stdout))
    assert "momentum_contrast" in new
    assert new - {"momentum_contrast", "einops", "typing_extensions"} <= set(
        sys.stdlib_module_names
    )
    assert not new & {"torchvision", "timm", "kornia", "matplotlib", "numpy"}


ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_test_command_is_what_ci_runs() -> None:
    """One command for a newcomer and for CI: the same extras, the same pytest call."""
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    commands = [line for line in readme.splitlines() if "python -m pytest" in line]
    assert len(commands) == 1, commands
    readme_extras = re.findall(r"pip install -e '\.\[([\w,]+)\]'", commands[0])
    ci_extras = re.findall(r"pip install -q -e '\.\[([\w,]+)\]'", ci)
    assert readme_extras == ci_extras == ["test"], (readme_extras, ci_extras)
    assert "torch==2.14.1 torchvision==0.29.1" in commands[0]
    assert "pip install -q torch==2.14.1 torchvision==0.29.1" in ci
    pytest_call = re.search(r"python -m pytest.*$", commands[0])
    assert pytest_call is not None and "-n auto" in pytest_call.group()
    assert re.search(rf"^{re.escape(pytest_call.group())}$", ci, re.M), pytest_call.group()
    assert "apt-get install -y chromium" in readme and "apt-get install -y -qq chromium" in ci


def test_test_extra_holds_what_the_docs_tests_need() -> None:
    """Without these the docs tests would fail: the test extra must install them."""
    requires = importlib.metadata.requires("momentum-contrast") or []
    test_extra = {
        re.split(r"[<>=!~ ;\[]", r)[0].lower()
        for r in requires
        if re.search(r"extra == [\"']test[\"']", r)
    }
    assert {"mkdocs", "mkdocs-material", "mkdocstrings", "playwright", "matplotlib"} <= test_extra


@pytest.mark.xdist_group("grouping_check")
def test_xdist_groups_keep_their_tests_on_one_worker(request: pytest.FixtureRequest) -> None:
    """The README's test command (``--dist loadgroup``) runs each ``xdist_group`` on one
    worker, so that the costly module fixtures of a group run once: pytest-xdist marks the
    group in the node id (pytest 9.2 keeps node ids where xdist 3.8 no longer writes it,
    and the groups split silently)."""
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("not a pytest-xdist worker under --dist loadgroup")
    assert request.node.nodeid.endswith("@grouping_check"), request.node.nodeid
