"""Resuming in one process: after a crash metrics.csv holds every step once; CPU
augmentation is a function of (seed, epoch, position); older checkpoints still load."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from example_runner import V12, import_examples, losses, metrics, run
from torch import nn

import_examples()
from data import Images, epoch_batches, loader  # noqa: E402

from momentum_contrast.augment import MoCoV2Augment  # noqa: E402


def test_crash_after_a_checkpoint_logs_every_step_once(tmp_path: Path) -> None:
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    run("moco_v2.py", *V12, "--max-steps", "7", "--output-dir", str(straight))
    run("moco_v2.py", *V12, "--max-steps", "3", "--output-dir", str(crashed))
    (at_3,) = crashed.glob("checkpoint_*.pt")
    shutil.copy(at_3, tmp_path / "kept.pt")
    run("moco_v2.py", *V12, "--max-steps", "5", "--resume", "auto", "--output-dir", str(crashed))
    # the crash: steps 4 and 5 (and the kNN row of the epoch end at 4) are in metrics.csv,
    # but the newest checkpoint on disk is that of step 3
    for ckpt in crashed.glob("checkpoint_*.pt"):
        ckpt.unlink()
    shutil.copy(tmp_path / "kept.pt", at_3)
    assert [r["step"] for r in metrics(crashed)].count("4") == 2
    result = run(
        "moco_v2.py", *V12, "--max-steps", "7", "--resume", "auto", "--output-dir", str(crashed)
    )
    assert "at step 3" in result.stdout
    assert [r["step"] for r in metrics(crashed)] == [r["step"] for r in metrics(straight)]
    assert losses(crashed) == losses(straight)  # bit for bit, across an epoch boundary
    assert (crashed / "metrics.png").is_file()


def views(workers: int, epoch: int, start: int = 0) -> dict[int, torch.Tensor]:
    """Image index -> its first view, for one epoch of CPU augmentation (4 batches of 4)."""
    images = torch.randint(0, 256, (16, 3, 20, 20), dtype=torch.uint8, generator=torch.Generator())
    data = Images(images, torch.arange(16), transform=MoCoV2Augment(16, blur_p=0.0))
    order = epoch_batches(16, 4, seed=0, epoch=epoch, start=start, view_seeds=True)
    batches = loader(data, order, workers=workers, seed=0)
    out = {}
    for (view, _), labels in batches:
        out.update({int(i): v for i, v in zip(labels, view, strict=True)})
    return out


def same_image_views(epoch: int) -> list[torch.Tensor]:
    """Views of 16 copies of one image, in loading order: only the augmentation differs."""
    image = torch.randint(0, 256, (1, 3, 20, 20), dtype=torch.uint8).expand(16, -1, -1, -1)
    data = Images(image.contiguous(), torch.arange(16), transform=MoCoV2Augment(16, blur_p=0.0))
    order = epoch_batches(16, 4, seed=0, epoch=epoch, view_seeds=True)
    batches = loader(data, order, workers=2, seed=0)
    return [v for (view, _), _ in batches for v in view]


def test_cpu_augmentation_depends_on_seed_epoch_and_position_only() -> None:
    torch.manual_seed(0)
    first, second = same_image_views(0), same_image_views(1)
    assert not any(torch.equal(a, b) for a, b in zip(first, second, strict=True))  # new epoch
    one_worker, two_workers = views(1, epoch=0), views(2, epoch=0)
    assert one_worker.keys() == two_workers.keys() and len(one_worker) == 16
    assert all(torch.equal(one_worker[i], two_workers[i]) for i in one_worker)  # any worker
    resumed = views(2, epoch=0, start=2)  # the run resumed after 2 of 4 batches
    assert len(resumed) == 8 and all(torch.equal(resumed[i], one_worker[i]) for i in resumed)


def test_checkpoint_written_under_ddp_by_older_scripts_loads(tmp_path: Path) -> None:
    from checkpoints import load_states, state_of

    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    saved = {"model": {f"module.{k}": v + 1 for k, v in model.state_dict().items()}}
    load_states({"model": model}, saved)
    assert all(torch.equal(v, saved["model"][f"module.{k}"]) for k, v in model.state_dict().items())
    assert list(state_of({"model": model})["model"]) == list(model.state_dict())
    with pytest.raises(RuntimeError, match="Missing key"):
        load_states({"model": model}, {"model": {"other.weight": torch.zeros(4, 3)}})


def test_a_resume_with_another_batch_size_counts_epochs_not_steps(tmp_path: Path) -> None:
    """Step 4 of 4-step epochs was taken for step 4 of 2-step epochs: the second epoch was
    skipped, with a warning that only named the changed flag. At an epoch's end the epochs
    are counted; within one the resume is refused."""
    first, within, out = tmp_path / "first", tmp_path / "within", tmp_path / "out"
    three = [*V12, "--epochs", "3"]
    run("moco_v2.py", *three, "--max-steps", "4", "--output-dir", str(first))  # the 1st epoch
    run("moco_v2.py", *three, "--max-steps", "3", "--output-dir", str(within))
    bigger = [*three, "--batch-size", "32", "--output-dir", str(out)]  # 2 steps per epoch
    (end,), (inside,) = first.glob("checkpoint_*.pt"), within.glob("checkpoint_*.pt")
    result = run("moco_v2.py", *bigger, "--resume", str(end))
    assert "epochs had 4 steps, this run's have 2: it resumes at step 2" in result.stderr
    assert "at step 2" in result.stdout
    rows = [(int(r["step"]), int(r["epoch"])) for r in metrics(out) if r["loss"]]
    assert rows == [(3, 1), (4, 1), (5, 2), (6, 2)]  # epochs 2 and 3, in 2-step epochs
    refused = run("moco_v2.py", *bigger[:-1], str(tmp_path / "x"), "--resume", str(inside),
                  check=False)  # fmt: skip
    assert "step 3 is within an epoch of 4 steps, this run's have 2" in refused.stderr
