"""The example scripts' ViTs: vit_small has the MoCo v3 paper's 12 attention heads, every
checkpoint records the head count (the weights cannot tell it), and a resume refuses a
checkpoint whose head count differs from the architecture's (or is not recorded)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from example_runner import V3, import_examples

import_examples()
from checkpoints import load_resume  # noqa: E402
from harness import VITS, attention_heads, backbone  # noqa: E402
from moco_v3 import MUST_MATCH, WARN_IF_CHANGED, parse_args  # noqa: E402


def test_the_vits_heads() -> None:
    heads = {arch: attention_heads(arch, backbone(arch, 32)[0]) for arch in VITS}
    assert heads == {
        "vit_tiny": 3, "vit_small": 12, "vit_base": 12,  # ViT-S: 12 in the MoCo v3 paper
    }  # fmt: skip
    assert attention_heads("resnet50", backbone("resnet18", 32)[0]) is None


@pytest.mark.parametrize(("recorded", "refused"), [(3, False), (None, True), (6, True)])
def test_a_resume_refuses_another_head_count(
    recorded: int | None, refused: bool, tmp_path: Path
) -> None:
    args = parse_args([*V3, "--arch", "vit_tiny", "--resume", "x"])
    path = tmp_path / "checkpoint_0000001.pt"
    ckpt = {"recipe": "moco_v3", "step": 1, "args": vars(args), "model": {}, "rng": []}
    torch.save(ckpt | ({} if recorded is None else {"num_heads": recorded}), path)
    args.resume = str(path)
    if refused:
        with pytest.raises(SystemExit, match=r"attention heads, --arch vit_tiny has 3"):
            load_resume(args, "moco_v3", MUST_MATCH, WARN_IF_CHANGED)
    else:
        assert load_resume(args, "moco_v3", MUST_MATCH, WARN_IF_CHANGED) is not None
