"""The GitHub workflows (.github/workflows), which cannot run here: what each promises is read
from the files (``.ci/run`` lints them with yamllint and actionlint), and the release's
notes step is run on CHANGELOG.md."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"


def workflow(name: str) -> dict[str, Any]:
    loaded: dict[Any, Any] = yaml.safe_load((WORKFLOWS / name).read_text())
    loaded["on"] = loaded.pop(True, loaded.get("on"))  # YAML 1.1 reads the key `on` as True
    return loaded


def steps_text(job: dict[str, Any]) -> str:
    return "\n".join(str(step.get("run", "")) + str(step.get("uses", "")) for step in job["steps"])


def test_ci_runs_ci_run_and_the_two_ends_of_the_support_matrix() -> None:
    ci = workflow("ci.yml")
    assert set(ci["on"]) == {"push", "pull_request"}
    assert "CI=true bash .ci/run" in steps_text(ci["jobs"]["ci"])
    rows = ci["jobs"]["compat"]["strategy"]["matrix"]["include"]
    floor = re.search(r'"torch>=([\d.]+)"', (ROOT / "pyproject.toml").read_text())
    pinned = re.search(r"pip install -q torch==([\d.]+)", (ROOT / ".ci" / "run").read_text())
    assert floor and pinned
    assert rows[0]["torch"].rsplit(".", 1)[0] == floor[1]  # the floor: 2.5.1 for torch>=2.5
    assert rows[-1]["torch"] == pinned[1]  # the newest: the one .ci/run pins
    assert ".ci/compat" in steps_text(ci["jobs"]["compat"])


def test_the_docs_site_is_built_strictly_and_deployed_from_main() -> None:
    docs = workflow("docs.yml")
    assert docs["on"]["push"]["branches"] == ["main"]
    assert "mkdocs build --strict" in steps_text(docs["jobs"]["build"])
    deploy = docs["jobs"]["deploy"]
    assert deploy["permissions"] == {"pages": "write", "id-token": "write"}
    assert "actions/deploy-pages" in steps_text(deploy)


def test_a_release_publishes_by_trusted_publishing_from_the_pypi_environment() -> None:
    release = workflow("release.yml")
    assert release["on"] == {"push": {"tags": ["v*"]}}
    build = steps_text(release["jobs"]["build"])
    assert "python -m build" in build and "twine check --strict" in build
    pypi = release["jobs"]["pypi"]
    assert pypi["environment"]["name"] == "pypi" and pypi["permissions"] == {"id-token": "write"}
    assert "pypa/gh-action-pypi-publish" in steps_text(pypi)
    assert release["jobs"]["github-release"]["permissions"] == {"contents": "write"}
    assert release["permissions"] == {"contents": "read"}  # nothing else may write


def _notes_program() -> str:
    """The awk program of the release's step that cuts the version's CHANGELOG section."""
    build = steps_text(workflow("release.yml")["jobs"]["build"])
    program = re.search(r"awk -v v=\"\$version\" '(.*?)' CHANGELOG.md", build, re.S)
    assert program, "release.yml: the CHANGELOG step is gone"
    return program[1]


@pytest.mark.skipif(shutil.which("awk") is None, reason="needs awk")
def test_the_release_notes_are_the_versions_changelog_section() -> None:
    changelog = (ROOT / "CHANGELOG.md").read_text()
    released = re.findall(r"^## \[(\d+\.\d+\.\d+)\]", changelog, re.M)
    assert len(released) >= 3, released
    for version in released:
        notes = subprocess.run(
            ["awk", "-v", f"v={version}", _notes_program(), "CHANGELOG.md"],
            cwd=ROOT, capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        section = changelog.split(f"## [{version}]", 1)[1].split("\n## [", 1)[0]
        assert notes.strip() and notes.strip() == section.split("\n", 1)[1].strip(), version
    missing = subprocess.run(
        ["awk", "-v", "v=9.9.9", _notes_program(), "CHANGELOG.md"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert missing.returncode == 1 and "no section 9.9.9" in missing.stderr
