"""Every code block of the docs runs: Python blocks are executed page by page (each page's
blocks in one namespace, in order), and every shell command is checked against the
repository: example-script commands resolve their flags with ``--print-config``,
scripts and ``pip`` extras exist, anything else must be on a short list."""

from __future__ import annotations

import argparse
import json
import os
import py_compile
import re
import shlex
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
KNOWN_TOOLS = {"mkdocs", "ruff"}  # their parsers (click, clap) refuse unknown flags with --help


def blocks(page: Path) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(page.read_text())]


PAGES = sorted(DOCS.rglob("*.md"))
PYTHON_PAGES = [p for p in PAGES if any(lang == "python" for lang, _ in blocks(p))]


def shell_commands() -> list[tuple[str, str]]:
    out = []
    for page in [*PAGES, ROOT / "README.md", ROOT / "examples" / "README.md"]:
        for lang, code in blocks(page):
            if lang != "bash":
                continue
            for line in code.replace("\\\n", " ").splitlines():
                line = line.split(" #")[0].strip()
                if line and not line.startswith("#"):
                    for part in line.split("&&"):
                        out.append((str(page.relative_to(ROOT)), part.strip()))
    return out


def test_every_block_is_python_or_bash() -> None:
    for page in PAGES:
        for lang, _ in blocks(page):
            assert lang in {"python", "bash"}, (
                f"{page}: a ```{lang} block is neither run nor checked"
            )
    assert len(PYTHON_PAGES) >= 8, PYTHON_PAGES


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("page", PYTHON_PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_python_blocks_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # blocks may write files (checkpoints)
    # torchrun's environment, for the blocks that join a process group (a one-process group)
    for key, value in {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
    }.items():
        monkeypatch.setenv(key, value)
    torch.manual_seed(0)
    namespace: dict[str, object] = {"__name__": f"docs_{page.stem}"}
    try:
        for i, (lang, code) in enumerate(blocks(page)):
            if lang == "python":
                exec(compile(code, f"{page.relative_to(ROOT)} block {i}", "exec"), namespace)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _pip_extras() -> set[str]:
    return set(metadata.metadata("momentum-contrast").get_all("Provides-Extra") or [])


SHELL_COMMANDS = shell_commands()


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("where, command", SHELL_COMMANDS, ids=lambda x: x[:60])
def test_shell_commands_match_the_repository(where: str, command: str) -> None:
    argv = shlex.split(command)
    while re.fullmatch(r"[A-Z_]+=\S*", argv[0]):  # environment variables for the command
        argv = argv[1:]
    if argv[0] == "torchrun":  # torchrun's own parser reads its options; then the script
        from torch.distributed.run import get_args_parser

        get_args_parser().parse_args(argv[1:])  # an unknown option exits with 2
        argv = ["python", *argv[next(i for i, a in enumerate(argv) if a.endswith(".py")) :]]
    if argv[0] == "sbatch":  # sbatch's options, the batch script, then what it runs
        at = next(i for i, a in enumerate(argv) if a.endswith(".sbatch"))
        assert (ROOT / argv[at]).is_file(), (where, command)
        argv = ["python", *argv[at + 1 :]]
    if argv[0] in {"python", "python3"} and argv[1:3] == ["-m", "venv"]:
        assert len(argv) == 4 and not argv[3].startswith("-"), (where, command)
        # the page activates the environment it creates
        assert (where, f". {argv[3]}/bin/activate") in SHELL_COMMANDS, (where, command)
        return
    if argv[0] in {"python", "python3"} and argv[1:3] == ["-m", "pytest"]:
        # pytest's own parser reads the flags (and the project's configuration); an
        # unknown flag exits with 4. Collecting one small file keeps it quick.
        done = _run([sys.executable, *argv[1:], "--collect-only", "-q", "tests/test_package.py"])
        assert done.returncode == 0, (where, command, done.stdout[-2000:], done.stderr[-2000:])
        return
    if argv[0] in {"python", "python3"} and argv[1:3] == ["-m", "momentum_contrast.convert"]:
        from momentum_contrast.convert._cli import _parser

        parsed = _parser().parse_args(argv[3:])  # a bad flag exits with 2: the test fails
        assert parsed.to in {"torchvision", "timm", "detectron2"}, (where, command)
        assert [parsed.src, parsed.dst] == argv[3:5], (where, command)
        return
    if argv[:2] == ["sudo", "apt-get"] or argv[0] == "apt-get":  # system packages
        if argv[-1] == "update":  # apt-get needs its package lists first on a fresh machine
            assert argv[-2:] == ["apt-get", "update"] and len(argv) <= 3, command
            return
        packages = {a for a in argv[argv.index("install") + 1 :] if not a.startswith("-")}
        assert packages <= {"chromium", "slurm-wlm"}, command  # the docs site and Slurm tests
        return
    if argv[0] == ".":  # activating a virtual environment
        assert argv[1].endswith("bin/activate"), command
        return
    if argv[0] == "pip":
        assert argv[1] == "install", command
        for spec in argv[2:]:
            if spec.startswith(".["):
                assert set(spec[2:-1].split(",")) <= _pip_extras(), (where, command)
            elif spec == ".":  # this checkout
                assert (ROOT / "pyproject.toml").is_file(), (where, command)
            elif spec != "-e":
                # not `momentum-contrast`: it is not on PyPI yet, and a pasted line must work
                assert re.fullmatch(r"torch(vision)?==[\d.]+|lightly==[\d.]+", spec), (
                    where,
                    command,
                )
        return
    if argv[0] in KNOWN_TOOLS:  # the tool's own parser: an unknown command or flag fails
        done = _run([sys.executable, "-m", argv[0], *argv[1:], "--help"])
        assert done.returncode == 0, (where, command, done.stderr[-2000:])
        if argv[0] == "mkdocs":
            assert (ROOT / "mkdocs.yml").is_file()
        return
    if argv[0] == "bash":
        assert (ROOT / argv[1]).is_file(), (where, command)
        return
    assert argv[0] in {"python", "python3"}, f"{where}: unknown command {command!r}"
    script = ROOT / argv[1]
    assert script.is_file(), (where, command)
    py_compile.compile(str(script), doraise=True)
    if script.parent.name == "examples" and script.name != "linear_eval.py":
        out = subprocess.run(
            [sys.executable, str(script), *argv[2:], "--print-config"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        )
        assert out.returncode == 0, (where, command, out.stderr[-2000:])
        assert json.loads(out.stdout)["arch"], out.stdout
    elif script.name == "linear_eval.py":  # needs a checkpoint: parse with its parser
        parsed = linear_eval_flags(argv[2:])
        for flag in (a for a in argv[2:] if a.startswith("--")):  # each one was read
            name = flag[2:].split("=")[0].replace("-", "_")
            assert getattr(parsed, name) is not None, (where, command, flag)


def linear_eval_flags(argv: list[str]) -> argparse.Namespace:
    """The flags of ``examples/linear_eval.py`` parsed by the script's own parser (the
    architecture a checkpoint would name given as resnet18); a bad flag raises SystemExit."""
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import linear_eval
    finally:
        sys.path.remove(str(ROOT / "examples"))
    return linear_eval.build_parser(False, {"arch": "resnet18", "image_size": 224}).parse_args(argv)


def test_linear_eval_flags_are_parsed_not_grepped() -> None:
    """The check above reads flags with the script's parser: one it does not define fails
    (as a grep of the source for "--seed" would have passed a misspelled --sed)."""
    parsed = linear_eval_flags(["--pretrained", "a.pt", "--epochs", "3", "--seed=4"])
    assert (parsed.pretrained, parsed.epochs, parsed.seed) == ("a.pt", 3, 4)
    with pytest.raises(SystemExit):
        linear_eval_flags(["--pretrained", "a.pt", "--sed", "4"])
    with pytest.raises(SystemExit):
        linear_eval_flags(["--pretrained", "a.pt", "--epochs", "three"])


@pytest.mark.parametrize("script", ["augment_grid.py", "performance_plot.py"])
def test_docs_figure_scripts_draw_their_figures(script: str, tmp_path: Path) -> None:
    out = tmp_path / "figure.png"
    done = subprocess.run(
        [sys.executable, str(DOCS / "scripts" / script), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 20_000
