"""``--arch``: any torchvision classification model or ``timm:NAME`` trains, through
``strip_classifier``; an unknown name stops before anything is built, naming the flag."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from example_runner import V12, losses, run


@pytest.mark.parametrize("arch", ["mobilenet_v3_small", "timm:resnet18"])
def test_a_torchvision_or_timm_backbone_trains(tmp_path: Path, arch: str) -> None:
    if arch.startswith("timm:"):
        pytest.importorskip("timm")
    out = tmp_path / "run"
    run("moco_v2.py", *V12, "--arch", arch, "--max-steps", "2", "--output-dir", str(out))
    values = losses(out)
    assert len(values) == 2 and all(math.isfinite(v) and v > 0 for v in values), values


@pytest.mark.parametrize("arch", ["resnet_bogus", "timm:no_such_model"])
def test_an_unknown_arch_is_named(tmp_path: Path, arch: str) -> None:
    result = run("moco_v2.py", *V12, "--arch", arch, "--output-dir", str(tmp_path), check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: --arch {arch}"), result.stderr
