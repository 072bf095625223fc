"""Two-process (gloo, CPU) runs of the example scripts: a run interrupted and resumed is the
uninterrupted run bit for bit, every rank holds the same queue, and checkpoints move
between 1 and 2 processes."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from example_runner import checkpoint, differences, losses, metrics, run, run_2p

# one pytest-xdist worker runs this file (--dist loadgroup): its module fixtures run once
pytestmark = pytest.mark.xdist_group("resume_distributed")

SMALL = [
    "--device",
    "cpu",
    "--image-size",
    "16",
    "--batch-size",
    "16",
    "--epochs",
    "2",
    "--workers",
    "0",
    "--shapes-train",
    "48",
    "--shapes-val",
    "16",
    "--knn-bank",
    "32",
    "--knn-queries",
    "16",
]  # fmt: skip  (3 steps per epoch, 6 in all)
V2 = [*SMALL, "--queue-size", "32", "--shuffle-splits", "2"]
V3 = [*SMALL, "--mlp-dim", "32", "--dim", "16"]
CPU_AUGMENT = [*V2, "--augment-on", "cpu", "--workers", "2"]
FINAL = ("model", "key_encoder", "queue", "optimizer", "rng", "step")


def dump(folder: Path) -> dict[str, str]:
    """Every rank writes its own state at each checkpoint into ``folder`` (see checkpoints.py)."""
    return {"MOCO_EXAMPLES_DUMP_DIR": str(folder)}


@pytest.fixture(scope="session")  # once per worker, even when other files run in between
def interrupted(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """A 2-process run stopped by ``--max-steps``, made once per module (a pristine copy is
    returned each time), with every rank's state dumped in its ``dump`` folder."""
    made: dict[tuple[str, ...], Path] = {}

    def make(script: str, flags: list[str], stop: int) -> Path:
        key = (script, *flags, str(stop))
        if key not in made:
            made[key] = tmp_path_factory.mktemp("interrupted")
            out = made[key] / "run"
            run_2p(script, *flags, "--max-steps", str(stop), "--output-dir", str(out),
                   env=dump(made[key] / "dump"))  # fmt: skip
        copy = tmp_path_factory.mktemp("copy")
        shutil.copytree(made[key], copy, dirs_exist_ok=True)
        return copy

    return make


@pytest.mark.parametrize(
    ("script", "flags", "stop"),
    [("moco_v2.py", V2, 1), ("moco_v3.py", V3, 4), ("moco_v2.py", CPU_AUGMENT, 2)],
    ids=["v2", "v3", "v2-cpu-augment-2-workers"],
)
def test_interrupted_run_resumes_bit_for_bit(
    script: str, flags: list[str], stop: int, tmp_path: Path, interrupted: Callable[..., Path]
) -> None:
    straight = tmp_path / "straight"
    run_2p(script, *flags, "--output-dir", str(straight))
    stopped = interrupted(script, flags, stop)
    # every rank holds the same queue and the same weights after the interruption's step
    rank0 = torch.load(stopped / "dump" / f"rank0_{stop:07d}.pt", weights_only=True)
    rank1 = torch.load(stopped / "dump" / f"rank1_{stop:07d}.pt", weights_only=True)
    if "queue" in rank0:
        assert not differences(rank0["queue"], rank1["queue"])
    parameters = [k for k in rank0["model"] if "running_" not in k and "num_batches" not in k]
    assert not [k for k in parameters if not torch.equal(rank0["model"][k], rank1["model"][k])]
    out = run_2p(script, *flags, "--resume", "auto", "--output-dir", str(stopped / "run"))
    assert f"at step {stop}" in out
    assert losses(stopped / "run") == losses(straight) and len(losses(straight)) == 6
    assert [r["step"] for r in metrics(stopped / "run")] == [r["step"] for r in metrics(straight)]
    done, expected = checkpoint(stopped / "run"), checkpoint(straight)
    assert len(expected["rng"]) == 2  # both ranks' generator states
    final = [k for k in FINAL if k in expected]  # v3 has no queue
    assert not differences({k: done[k] for k in final}, {k: expected[k] for k in final})


def test_checkpoints_move_from_2_processes_to_1_and_back(
    tmp_path: Path, interrupted: Callable[..., Path]
) -> None:
    one = interrupted("moco_v2.py", V2, 1) / "run"
    saved = checkpoint(one)
    assert any(k.startswith("0.") for k in saved["model"])  # saved without DDP's "module."
    result = run(
        "moco_v2.py",
        *V2,
        "--max-steps",
        "2",
        "--resume",
        "auto",
        "--output-dir",
        str(one),
        env=dump(tmp_path / "dump_1"),
    )
    assert "the random states of 2 processes, this run has 1" in result.stderr
    loaded = torch.load(tmp_path / "dump_1" / "rank0_loaded.pt", weights_only=True)
    assert not differences(loaded, {k: saved[k] for k in loaded})
    assert checkpoint(one)["step"] == 2

    v3_one, v3_two = tmp_path / "v3_one", tmp_path / "v3_two"
    run("moco_v3.py", *V3, "--max-steps", "2", "--output-dir", str(v3_one))
    saved = checkpoint(v3_one)
    shutil.copytree(v3_one, v3_two)
    out = run_2p(
        "moco_v3.py",
        *V3,
        "--max-steps",
        "3",
        "--resume",
        "auto",
        "--output-dir",
        str(v3_two),
        env=dump(tmp_path / "dump_2"),
    )
    assert "rank 1 has no saved random state" in out
    for rank in (0, 1):
        loaded = torch.load(tmp_path / "dump_2" / f"rank{rank}_loaded.pt", weights_only=True)
        assert not differences(loaded, {k: saved[k] for k in loaded})
    assert checkpoint(v3_two)["step"] == 3
    assert not any(k.startswith("module.") for k in checkpoint(v3_two)["model"])
