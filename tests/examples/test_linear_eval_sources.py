"""linear_eval.py --pretrained takes every kind of checkpoint momentum_contrast.convert
reads: the MoCo authors' (built from the released files' key names and shapes) and plain
backbone state dicts; bad files get one-line errors naming what is wrong."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torchvision
from example_runner import run

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_convert_official import official

FLAGS = [
    "--device", "cpu", "--batch-size", "16", "--epochs", "1", "--workers", "0",
    "--shapes-train", "64", "--shapes-val", "32", "--image-size", "64",
]  # fmt: skip


def test_the_authors_v2_checkpoint_is_evaluated(tmp_path: Path) -> None:
    torch.save(official("moco_v2_resnet50"), src := tmp_path / "moco_v2_800ep_pretrain.pth.tar")
    result = run("linear_eval.py", *FLAGS, "--pretrained", str(src))
    assert "top-1" in result.stdout and "backbone unchanged" in result.stdout


def test_a_plain_state_dict_needs_arch_and_then_runs(tmp_path: Path) -> None:
    state = {k: v for k, v in torchvision.models.resnet18().state_dict().items() if "fc." not in k}
    torch.save(state, src := tmp_path / "resnet18.pth")
    refused = run("linear_eval.py", *FLAGS, "--pretrained", str(src), check=False)
    assert refused.returncode != 0
    assert "does not name its architecture: pass --arch" in refused.stderr
    result = run("linear_eval.py", *FLAGS, "--arch", "resnet18", "--pretrained", str(src))
    assert "top-1" in result.stdout


def test_bad_files_get_one_line_errors(tmp_path: Path) -> None:
    torch.save(official("moco_v2_resnet50"), v2 := tmp_path / "v2.pth.tar")
    torch.save({"0.weight": torch.zeros(3, 3)}, head := tmp_path / "head.pth")
    (text := tmp_path / "notes.txt").write_text("not a checkpoint")
    for extra, expected in (
        (["--arch", "resnet18", "--pretrained", str(v2)], "does not fit --arch resnet18: "),
        (["--arch", "resnet18", "--pretrained", str(head)], "holds no backbone"),
        (["--pretrained", str(text)], "is not a PyTorch checkpoint"),
        (["--pretrained", str(tmp_path / "missing.pt")], "no such checkpoint file"),
    ):
        result = run("linear_eval.py", *FLAGS, *extra, check=False)
        assert result.returncode != 0, extra
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
