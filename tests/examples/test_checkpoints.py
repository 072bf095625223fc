"""No checkpoint is ever lost (examples/checkpoints.py): a new run never writes over a
folder that holds one, --resume auto and the clean-up touch only the scripts' own numbered
files, the newest --keep stay, a checkpoint cut short is skipped for the one before, and a
--save-every checkpoint in the middle of an epoch resumes exactly. One process, MoCo v2."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from example_runner import V12, checkpoint, differences, losses, metrics, run

pytestmark = pytest.mark.xdist_group("checkpoints")

STEPS = 8  # 64 images, batch 16: 4 steps an epoch, 2 epochs
FINAL = ("model", "key_encoder", "queue", "optimizer", "rng", "step")


def numbered(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if re.fullmatch(r"checkpoint_\d{7}\.pt", p.name))


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run of STEPS steps."""
    out = tmp_path_factory.mktemp("straight")
    run("moco_v2.py", *V12, "--output-dir", str(out))
    return out


def assert_same_run(out: Path, straight: Path) -> None:
    assert losses(out) == losses(straight) and len(losses(straight)) == STEPS
    assert [r["step"] for r in metrics(out)] == [r["step"] for r in metrics(straight)]
    done, expected = checkpoint(out), checkpoint(straight)
    assert not differences({k: done[k] for k in FINAL}, {k: expected[k] for k in FINAL})


def test_a_new_run_into_a_folder_that_holds_a_run_is_refused(tmp_path: Path) -> None:
    run("moco_v2.py", *V12, "--max-steps", "2", "--output-dir", str(tmp_path))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    result = run("moco_v2.py", *V12, "--output-dir", str(tmp_path), check=False)
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert str(tmp_path) in message and "checkpoint_0000002.pt" in message, result.stderr
    assert "--resume auto" in message and "another --output-dir" in message
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert after == before  # the checkpoint and metrics.csv untouched


def test_resume_auto_and_the_clean_up_touch_only_the_numbered_checkpoints(
    tmp_path: Path,
) -> None:
    run("moco_v2.py", *V12, "--max-steps", "1", "--output-dir", str(tmp_path))
    best = tmp_path / "checkpoint_best.pt"  # a user's own file: it sorts after the numbered
    torch.save({"note": "the user's best model"}, best)
    content = best.read_bytes()
    result = run(
        "moco_v2.py", *V12, "--max-steps", "3", "--save-every", "1", "--resume", "auto",
        "--output-dir", str(tmp_path),
    )  # fmt: skip
    assert "resumed from" in result.stdout and "at step 1" in result.stdout
    assert best.read_bytes() == content  # neither resumed from nor deleted
    assert numbered(tmp_path) == ["checkpoint_0000002.pt", "checkpoint_0000003.pt"]  # --keep 2


def test_keep_sets_how_many_checkpoints_stay(tmp_path: Path) -> None:
    flags = [*V12, "--max-steps", "5", "--save-every", "1", "--keep", "3"]
    run("moco_v2.py", *flags, "--output-dir", str(tmp_path))
    assert numbered(tmp_path) == [f"checkpoint_000000{s}.pt" for s in (3, 4, 5)]


def test_a_save_every_checkpoint_inside_an_epoch_resumes_exactly(
    tmp_path: Path, straight: Path
) -> None:
    # checkpoints after steps 3 (--save-every, inside the first epoch), 4 (the epoch's end)
    # and 5 (the stop); the run dies after 5 with only step 3's on the disk
    flags = [*V12, "--save-every", "3", "--keep", "3", "--output-dir", str(tmp_path)]
    run("moco_v2.py", *flags, "--max-steps", "5")
    assert numbered(tmp_path) == [f"checkpoint_000000{s}.pt" for s in (3, 4, 5)]
    for step in (4, 5):
        (tmp_path / f"checkpoint_000000{step}.pt").unlink()
    result = run("moco_v2.py", *flags, "--resume", "auto")
    assert "at step 3" in result.stdout
    assert_same_run(tmp_path, straight)


def test_a_checkpoint_cut_short_is_skipped_for_the_one_before(
    tmp_path: Path, straight: Path
) -> None:
    flags = [*V12, "--save-every", "2", "--output-dir", str(tmp_path)]
    run("moco_v2.py", *flags, "--max-steps", "5")
    assert numbered(tmp_path) == ["checkpoint_0000004.pt", "checkpoint_0000005.pt"]
    newest = tmp_path / "checkpoint_0000005.pt"  # a write that a dying disk cut short
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    shutil.copy(newest, tmp_path / "checkpoint.tmp")  # and a write that never finished
    named = run("moco_v2.py", *flags, "--resume", str(newest), check=False)
    assert named.returncode != 0 and "is not a checkpoint" in named.stderr  # named: no fallback
    result = run("moco_v2.py", *flags, "--resume", "auto")
    assert "checkpoint_0000005.pt is not a checkpoint" in result.stderr
    assert "taking the one before" in result.stderr and "at step 4" in result.stdout
    assert_same_run(tmp_path, straight)
