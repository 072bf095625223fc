"""``--arch``: any torchvision classification model or ``timm:NAME`` trains, through
``strip_classifier``; an unknown name stops before anything is built, naming the flag."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from example_runner import V12, import_examples, losses, run


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
    ("arch", "size", "message"),
    [
        ("squeezenet1_0", 32, "error: --arch squeezenet1_0: strip_classifier: "),
        ("vit_b_16", 40, "does not work at --image-size 40"),
        ("timm:vit_tiny_patch16_224", 32, "does not work at --image-size 32"),
    ],
)
def test_a_backbone_that_cannot_be_used_is_named_in_one_line(
    arch: str, size: int, message: str
) -> None:
    """Not a traceback from the model's constructor, strip_classifier or the first step:
    ``sys.exit`` with one line (what the scripts print on stderr, exit status 1). Both
    pre-training scripts build their backbone with harness.checked_backbone."""
    if arch.startswith("timm:"):
        pytest.importorskip("timm")
    import_examples()
    import harness

    with pytest.raises(SystemExit) as stop:
        harness.checked_backbone(arch, size)
    line = str(stop.value.code)
    assert line.startswith(f"error: --arch {arch}") and message in line and "\n" not in line


def test_the_backbone_check_keeps_the_random_state() -> None:
    """Its training-mode forward runs stochastic depth; the run's random stream stays the
    model's."""
    import_examples()
    import harness

    torch.manual_seed(0)
    harness.backbone("efficientnet_b0", 32)
    expected = torch.get_rng_state()
    torch.manual_seed(0)
    features, _ = harness.checked_backbone("efficientnet_b0", 32)
    assert torch.equal(torch.get_rng_state(), expected)
    with torch.no_grad():
        features.train()(torch.zeros(2, 3, 32, 32))  # what the check runs, unguarded
    assert not torch.equal(torch.get_rng_state(), expected)
