"""Every public name is in the API reference of the built site, with a docstring that
has an example; attribute docstrings' examples (not collected by doctest) run here."""

from __future__ import annotations

import doctest
import importlib
import inspect
import re
from pathlib import Path

import pytest
from _site import ROOT, build_site, require

# one pytest-xdist worker runs this file (--dist loadgroup): its module fixtures run once
pytestmark = pytest.mark.xdist_group("site")

MODULES = [
    "momentum_contrast.encoder",
    "momentum_contrast.queue",
    "momentum_contrast.losses",
    "momentum_contrast.heads",
    "momentum_contrast.distributed",
    "momentum_contrast.norm",
    "momentum_contrast.vit",
    "momentum_contrast.optim",
    "momentum_contrast.knn",
    "momentum_contrast.convert",
    "momentum_contrast.augment",
    "momentum_contrast.augment.functional",
]


def _griffe():  # type: ignore[no-untyped-def]
    try:
        import griffe
    except ImportError:
        require(False, "griffe (pip install -e '.[docs]')")
    return griffe.load("momentum_contrast", search_paths=[str(ROOT / "src")])


def public_names() -> list[tuple[str, str]]:
    """``(module, name)`` for every name in a public module's ``__all__`` (sub-modules
    have their own page), and the package's own ``__all__``."""
    out = []
    for module in ["momentum_contrast", *MODULES]:
        mod = importlib.import_module(module)
        for name in mod.__all__:
            if not inspect.ismodule(getattr(mod, name)):
                out.append((module, name))
    return out


def test_every_public_module_has_all_and_its_own_api_page() -> None:
    pages = {p.read_text() for p in (ROOT / "docs" / "api").glob("*.md")}
    for module in MODULES:
        mod = importlib.import_module(module)
        assert hasattr(mod, "__all__"), module
        assert any(f"::: {module}\n" in page for page in pages), f"no API page for {module}"
        defined_here = {
            n
            for n, v in vars(mod).items()
            if not n.startswith("_")
            and (inspect.isfunction(v) or inspect.isclass(v))
            and v.__module__ == module
        }
        assert defined_here <= set(mod.__all__), f"{module}: public but not exported"


def _lookup(pkg, module: str, name: str):  # type: ignore[no-untyped-def]
    path = module.removeprefix("momentum_contrast").lstrip(".")
    obj = (pkg[path] if path else pkg)[name]
    return obj.final_target if obj.is_alias else obj


@pytest.mark.parametrize("module, name", public_names(), ids=lambda x: x)
def test_public_name_has_a_docstring_with_an_example(module: str, name: str) -> None:
    obj = _lookup(_griffe(), module, name)
    assert obj.docstring is not None, f"{module}.{name} has no docstring"
    text = obj.docstring.value
    assert "Examples:" in text and ">>> " in text, f"{module}.{name}: no example"
    if obj.is_attribute:  # doctest does not see attribute docstrings: run the example here
        test = doctest.DocTestParser().get_doctest(text, {}, f"{module}.{name}", None, 0)
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        runner.run(test)
        assert runner.failures == 0 and runner.tries > 0, f"{module}.{name}: example failed"


def test_public_methods_have_docstrings() -> None:
    pkg = _griffe()
    missing = []
    for module, name in public_names():
        obj = _lookup(pkg, module, name)
        if not obj.is_class:
            continue
        for member_name, member in obj.members.items():
            public = not member_name.startswith("_") and member_name != "extra_repr"
            if member.is_function and public and not member.docstring:
                missing.append(f"{module}.{name}.{member_name}")
    assert missing == []


def test_every_public_name_is_rendered_in_the_api_reference() -> None:
    site = build_site()
    html = "\n".join(p.read_text() for p in (site / "api").rglob("index.html"))
    anchors = set(re.findall(r'id="(momentum_contrast[\w.]*)"', html))
    for module, name in public_names():
        obj = getattr(importlib.import_module(module), name)
        home = (
            getattr(obj, "__module__", module) if inspect.isclass(obj) or callable(obj) else module
        )
        candidates = {f"{module}.{name}", f"{home}.{name}"}
        if module == "momentum_contrast.augment":  # defined in its private-ish sub-modules
            candidates.add(f"momentum_contrast.augment.{name}")
        assert candidates & anchors, f"{module}.{name} is not in the API reference"
    # the signature is shown, with annotations
    encoder = (site / "api" / "encoder" / "index.html").read_text()
    assert "MomentumEncoder" in encoder and "buffers" in encoder and "BufferMode" in encoder


def _overview_rows() -> dict[str, set[str]]:
    """The overview table of ``docs/api/index.md``: its page link -> the names in its row."""
    rows: dict[str, set[str]] = {}
    for line in (ROOT / "docs" / "api" / "index.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        link = re.search(r"\]\((\w[\w-]*\.md)\)", cells[-1]) if len(cells) == 3 else None
        if link is not None:
            rows[link.group(1)] = set(re.findall(r"`([\w.]+)`", cells[0]))
    return rows


def test_api_overview_lists_every_public_name_on_its_modules_row() -> None:
    """Every name in a public module's ``__all__`` is in the overview table, on the row
    that links to that module's page; the package's own names are on some row."""
    rows = _overview_rows()
    pages = {p.name: p.read_text() for p in (ROOT / "docs" / "api").glob("*.md")}
    missing = []
    for module in MODULES:
        page = next(n for n, text in pages.items() if f"::: {module}\n" in text)
        listed = rows.get(page, set())
        missing += [f"{module}.{name}" for name, _ in _exported(module) if name not in listed]
    everywhere = set().union(*rows.values())
    for name, _ in _exported("momentum_contrast"):
        if name not in everywhere and name != "__version__":
            missing.append(f"momentum_contrast.{name}")
    assert missing == [], f"not in docs/api/index.md's table: {missing}"
    assert "`momentum_contrast.__version__`" in pages["index.md"]


def _exported(module: str) -> list[tuple[str, object]]:
    """``(name, value)`` of ``module.__all__`` without sub-modules (they have their page)."""
    mod = importlib.import_module(module)
    values = [(name, getattr(mod, name)) for name in mod.__all__]
    return [(name, value) for name, value in values if not inspect.ismodule(value)]


def test_api_pages_are_in_the_navigation() -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in (ROOT / "docs" / "api").glob("*.md"):
        assert f"api/{page.name}" in nav, page.name
    assert Path(ROOT / "docs" / "changelog.md").read_text().strip() == '--8<-- "CHANGELOG.md"'
