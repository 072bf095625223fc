"""``--arch``: any torchvision classification model or ``timm:NAME`` trains, through
``strip_classifier``; an unknown name stops before anything is built, naming the flag."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from example_runner import TINY, V12, losses, run


@pytest.mark.parametrize("arch", ["mobilenet_v3_small", "timm:resnet18", "googlenet"])
def test_a_torchvision_or_timm_backbone_trains(tmp_path: Path, arch: str) -> None:
    """googlenet: its auxiliary classifiers (training mode only) are left out."""
    if arch.startswith("timm:"):
        pytest.importorskip("timm")
    out = tmp_path / "run"
    run("moco_v2.py", *V12, "--arch", arch, "--max-steps", "2", "--output-dir", str(out))
    values = losses(out)
    assert len(values) == 2 and all(math.isfinite(v) and v > 0 for v in values), values
    assert (out / "metrics.png").stat().st_size > 0  # also after a stop inside an epoch


@pytest.mark.parametrize(
    ("script", "arch", "flags", "message"),
    [
        ("moco_v2.py", "squeezenet1_0", [], "error: --arch squeezenet1_0: strip_classifier: "),
        ("moco_v3.py", "squeezenet1_0", [], "error: --arch squeezenet1_0: strip_classifier: "),
        ("moco_v2.py", "vit_b_16", ["--image-size", "40"], "does not work at --image-size 40"),
        ("moco_v2.py", "timm:vit_tiny_patch16_224", [], "does not work at --image-size 32"),
        ("moco_v3.py", "timm:vit_tiny_patch16_224", [], "does not work at --image-size 32"),
    ],
)
def test_a_backbone_that_cannot_be_used_is_named_in_one_line(
    tmp_path: Path, script: str, arch: str, flags: list[str], message: str
) -> None:
    """Not a traceback from the model's constructor, strip_classifier or the first step."""
    if arch.startswith("timm:"):
        pytest.importorskip("timm")
    base = V12 if script == "moco_v2.py" else TINY
    result = run(script, *base, "--arch", arch, *flags, "--output-dir", str(tmp_path), check=False)
    assert result.returncode == 1, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: --arch {arch}") and message in lines[-1], lines[-5:]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("arch", ["resnet_bogus", "timm:no_such_model"])
def test_an_unknown_arch_is_named(tmp_path: Path, arch: str) -> None:
    result = run("moco_v2.py", *V12, "--arch", arch, "--output-dir", str(tmp_path), check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: --arch {arch}"), result.stderr
