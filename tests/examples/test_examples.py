"""The example scripts, run for a few steps on the CPU with tiny settings."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest
import torch
from example_runner import EXAMPLES, V3, V12, assert_trained_sanely, losses, run, write_png

# Enough images for the kNN monitor to tell above-chance features (at random initialisation
# about 40% with the small CNN, 20% with vit_tiny; chance is 10%) from broken ones: with a
# bank of 64 images every query votes over the whole bank and lands near chance.
KNN_DATA = ["--shapes-train", "400", "--shapes-val", "200", "--knn-bank", "400",
            "--knn-queries", "200"]  # fmt: skip


@pytest.mark.parametrize(
    ("script", "flags"),
    [
        ("moco_v1.py", V12),
        ("moco_v2.py", V12),
        ("moco_v3.py", V3),
        ("moco_v3.py", [*V3, "--arch", "vit_tiny"]),
        ("moco_v2.py", [*V12, "--augment-on", "cpu"]),
    ],
    ids=["v1", "v2", "v3-resnet", "v3-vit", "v2-cpu-augment"],
)
def test_script_runs_and_checkpoints(script: str, flags: list[str], tmp_path: Path) -> None:
    result = run(script, *flags, *KNN_DATA, "--max-steps", "3", "--output-dir", str(tmp_path))
    # 3 steps: finite losses, the kNN monitor above chance at random initialisation, and the
    # kNN at the stop (no epoch ended): too short to learn, test_linear_evaluation learns
    assert_trained_sanely(tmp_path, result.stdout, steps=3)
    (ckpt,) = tmp_path.glob("checkpoint_*.pt")
    state = torch.load(ckpt, weights_only=True)
    assert state["step"] == 3 and state["recipe"].startswith("moco_")
    assert {"model", "key_encoder", "optimizer", "rng", "args"} <= state.keys()
    if "v3" not in script:
        assert state["queue"]["keys"].shape == (64, 128)


@pytest.mark.parametrize(
    ("script", "flags", "learns", "lr"),
    [("moco_v2.py", V12, True, "0.3"), ("moco_v3.py", V3, False, "10")],
    ids=["v2", "v3"],
)
def test_linear_evaluation(
    script: str, flags: list[str], learns: bool, lr: str, tmp_path: Path
) -> None:
    # One epoch, 25 steps: the BatchNorm statistics are the images' (after 4 steps they were
    # still the initial ones, the features nearly the same for every image, and the linear
    # classifier at chance whatever the script did). v2 learns in it; v3 (LARS, warm-up over
    # the epoch) does not yet: its kNN stays near the baseline.
    result = run(script, *flags, *KNN_DATA, "--epochs", "1", "--output-dir", str(tmp_path))
    assert_trained_sanely(tmp_path, result.stdout, steps=25, learns=learns)
    (ckpt,) = tmp_path.glob("checkpoint_*.pt")
    # The classifier: 10 epochs (250 steps). One epoch, at the v1/v2 protocol's lr 30, gave
    # 12.5-33% top-1 over four pre-training seeds, so whether the test passed hung on the
    # seed (a change of the queue's random start failed it); 10 epochs at lr 0.3 (v2) and
    # 10 per 256 images (v3, its protocol's 0.1 leaves it at chance) gave 20.5-25.5% and
    # 44.5-55.5% over four and three seeds (2026-12-07).
    evaluate = ["--device", "cpu", "--batch-size", "16", "--workers", "0", "--epochs", "10",
                "--shapes-train", "400", "--shapes-val", "200", "--lr", lr]  # fmt: skip
    result = run("linear_eval.py", *evaluate, "--pretrained", str(ckpt))
    found = re.search(r"top-1 (\d+\.\d)%, top-5 (\d+\.\d)% on (\d+) held-out", result.stdout)
    assert found and "backbone unchanged" in result.stdout, result.stdout[-2000:]
    top1, top5, images = float(found[1]), float(found[2]), int(found[3])
    # chance: 10% and 50% (10 classes); a classifier left untrained (--lr 1e-30) gives
    # 5.5-11% and 56-58% here
    assert images == 200 and top1 >= 15 and top5 >= 65, result.stdout[-2000:]


def test_image_folder_data(tmp_path: Path) -> None:
    for split in ("train", "val"):
        for c, colour in enumerate((0, 255)):
            folder = tmp_path / "data" / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(12):
                img = torch.full((3, 40 + 3 * i, 50 - i), colour, dtype=torch.uint8)
                write_png(img, str(folder / f"{i}.png"))
    out = tmp_path / "run"
    run(
        "moco_v2.py",
        *V12,
        "--data",
        str(tmp_path / "data"),
        "--max-steps",
        "2",
        "--output-dir",
        str(out),
    )
    assert len(losses(out)) == 2 and all(math.isfinite(v) for v in losses(out))


def test_clear_errors(tmp_path: Path) -> None:
    out = ["--output-dir", str(tmp_path / "out")]
    missing = run("moco_v2.py", *V12, "--data", str(tmp_path / "nope"), *out, check=False)
    assert missing.returncode != 0 and "has no train/ folder" in missing.stderr
    assert not (tmp_path / "out").exists()  # refused before anything: no folder with a .lock
    (tmp_path / "empty" / "train").mkdir(parents=True)
    empty = run("moco_v2.py", *V12, "--data", str(tmp_path / "empty"), check=False)
    assert empty.returncode != 0 and "empty" in (empty.stderr + empty.stdout).lower()
    arch = run("moco_v2.py", "--arch", "alexnet", check=False)
    # a torchvision model (any is accepted) that cannot take 32-px images: named, no traceback
    assert arch.returncode != 0 and "error: --arch alexnet does not work at --image-size 32" in (
        arch.stderr
    )
    assert "Traceback" not in arch.stderr
    run("moco_v2.py", *V12, "--max-steps", "1", "--output-dir", str(tmp_path / "v2"))
    other = run(
        "moco_v3.py", *V3, "--resume", "auto", "--output-dir", str(tmp_path / "v2"), check=False
    )
    assert other.returncode != 0 and "is a moco_v2 checkpoint, not moco_v3" in other.stderr


def test_batch_that_does_not_split_across_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    sys.path.insert(0, str(EXAMPLES))
    from moco_v2 import parse_args, validate

    monkeypatch.setenv("WORLD_SIZE", "4")  # what torchrun sets
    validate(parse_args([*V12, "--batch-size", "64"]), blur=False)
    with pytest.raises(SystemExit, match="--batch-size 30 does not split across 4 processes"):
        validate(parse_args([*V12, "--batch-size", "30"]), blur=False)
