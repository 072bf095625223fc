"""The source tree's shape: no import cycle, a shallow import graph, no module-level
mutable state and no process-wide hooks (DESIGN.md's conventions), read from the code."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "momentum_contrast"
MUTATORS = {"append", "extend", "insert", "pop", "popitem", "clear", "update", "setdefault",
            "add", "discard", "remove", "__setitem__"}  # fmt: skip
HOOKS = {"register_optimizer_step_post_hook", "register_optimizer_step_pre_hook",
         "register_module_forward_hook", "register_module_forward_pre_hook",
         "register_module_full_backward_hook", "register_module_buffer_registration_hook",
         "register_module_parameter_registration_hook"}  # fmt: skip


def modules() -> dict[str, ast.Module]:
    found = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = ast.parse(path.read_text())
    return found


def imports(tree: ast.Module, known: set[str]) -> set[str]:
    """The package's modules that ``tree`` imports, anywhere in it (lazy imports too)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module in known:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names} & known
    return out


def test_no_import_cycle_and_at_most_seven_levels() -> None:
    trees = modules()
    graph = {name: imports(tree, set(trees)) - {name} for name, tree in trees.items()}

    @functools.cache
    def levels(name: str, path: tuple[str, ...] = ()) -> int:
        assert name not in path, f"import cycle: {' -> '.join((*path, name))}"
        return 1 + max((levels(dep, (*path, name)) for dep in graph[name]), default=0)

    assert max(map(levels, graph)) <= 7  # 10 on 2026-12-06, before the reshaping


def test_no_module_level_mutable_state_and_no_process_wide_hooks() -> None:
    for name, tree in modules().items():
        top = set()
        for statement in tree.body:
            targets = (
                statement.targets
                if isinstance(statement, ast.Assign)
                else [getattr(statement, "target", None)]
            )
            top |= {t.id for t in targets if isinstance(t, ast.Name)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Global):
                raise AssertionError(f"{name}: `global {', '.join(node.names)}`")
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)
            ):
                owner, method = node.func.value.id, node.func.attr
                assert not (owner in top and method in MUTATORS), f"{name}: {owner}.{method}()"
                assert method not in HOOKS, f"{name}: process-wide {method}"
            if isinstance(node, (ast.Assign, ast.AugAssign)):
                for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    if isinstance(target, ast.Subscript) and isinstance(target.value, ast.Name):
                        assert target.value.id not in top, f"{name}: {target.value.id}[...] ="


def test_the_checks_see_what_they_look_for() -> None:
    shared = ast.parse("CACHE = {}\ndef f(k):\n    CACHE.setdefault(k, 1)\n")
    top = {"CACHE"}
    calls = [n for n in ast.walk(shared) if isinstance(n, ast.Call)]
    assert any(c.func.value.id in top and c.func.attr in MUTATORS for c in calls)  # type: ignore[attr-defined]
    looped = {"a": imports(ast.parse("import b"), {"a", "b"}), "b": {"a"}}
    assert "b" in looped["a"] and "a" in looped["b"]
