"""``moco_v3.py --fsdp`` on 2 gloo processes (CPU, float32, ``--arch vit_tiny``,
``--accumulate 2`` so that FSDP2's skipped gradient reductions are exercised too).

On the CPU neither run uses SyncBatchNorm (the script converts only on CUDA): each process
normalises its own micro-batch in the projector and predictor under DDP and under FSDP
alike, so the two runs compute the same thing and their losses and weights agree to
float32 rounding. With LARS: AdamW's first steps divide each gradient by its own size, and
turn the rounding of near-zero gradients (summed in another order by FSDP's
reduce-scatter than by DDP's all-reduce) into differences of the order of the learning
rate (measured: equal losses at steps 1-2, 2e-5 apart at step 3; with LARS, 2e-6).

An interrupted and resumed ``--fsdp`` run is the uninterrupted one bit for bit, and its
full (unsharded) checkpoint resumes in 1 process without ``--fsdp``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from example_runner import V3, checkpoint, differences, losses, metrics, run, run_2p

# one pytest-xdist worker runs this file (--dist loadgroup): its module fixtures run once
pytestmark = pytest.mark.xdist_group("fsdp_example")

FLAGS = [*V3, "--arch", "vit_tiny", "--accumulate", "2", "--max-steps", "4"]  # 4 steps: 1 epoch
FLAGS += ["--optimizer", "lars", "--lr", "0.5"]
# micro-batches of 8 images: BatchNorm over 4 turned float32 rounding (1e-6 at step 3) into
# 1e-3 at step 4 on some CPUs (their kernels round differently); over 8, 1e-6 at step 4
FLAGS += ["--batch-size", "32", "--shapes-train", "128"]


@pytest.fixture(scope="session")  # once per worker, even when other files run in between
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``fsdp`` and ``ddp``: 4 steps; ``stopped``: ``--fsdp`` stopped after 2 steps and
    resumed to 4; ``stopped_copy``: a copy of the checkpoint at step 2."""
    root = tmp_path_factory.mktemp("fsdp_runs")
    run_2p("moco_v3.py", *FLAGS, "--fsdp", "--output-dir", str(root / "fsdp"))
    run_2p("moco_v3.py", *FLAGS, "--output-dir", str(root / "ddp"))
    stopped = root / "stopped"
    run_2p("moco_v3.py", *FLAGS, "--fsdp", "--max-steps", "2", "--output-dir", str(stopped))
    shutil.copytree(stopped, root / "stopped_copy")
    out = run_2p("moco_v3.py", *FLAGS, "--fsdp", "--resume", "auto", "--output-dir", str(stopped))
    assert "resumed from" in out and "at step 2" in out
    return root


def test_fsdp_run_equals_the_ddp_run(runs: Path) -> None:
    fsdp, ddp = [float(x) for x in losses(runs / "fsdp")], [float(x) for x in losses(runs / "ddp")]
    assert len(fsdp) == 4
    torch.testing.assert_close(torch.tensor(fsdp), torch.tensor(ddp), rtol=1e-5, atol=1e-5)
    sharded, replicated = checkpoint(runs / "fsdp"), checkpoint(runs / "ddp")
    for part in ("model", "key_encoder"):  # the same names: a full state dict, no prefix
        assert sharded[part].keys() == replicated[part].keys()
        for name, value in replicated[part].items():
            assert sharded[part][name].shape == value.shape, name
            torch.testing.assert_close(sharded[part][name], value, rtol=1e-5, atol=1e-5, msg=name)
    optimizer, expected = sharded["optimizer"], replicated["optimizer"]  # keyed by position
    assert optimizer["param_groups"] == expected["param_groups"]
    assert optimizer["state"].keys() == expected["state"].keys()
    for i, state in expected["state"].items():  # momenta: sums of gradients, whose rounding
        for key, value in state.items():  # BatchNorm over 8 images amplifies: 1e-4
            torch.testing.assert_close(optimizer["state"][i][key], value, rtol=1e-4, atol=1e-4)
    at_step_2 = checkpoint(runs / "stopped_copy")["model"]["0.1.0.weight"]
    assert not torch.equal(sharded["model"]["0.1.0.weight"], at_step_2)  # it did train


def test_interrupted_fsdp_run_resumes_bit_for_bit(runs: Path) -> None:
    assert losses(runs / "stopped") == losses(runs / "fsdp")
    assert [r["step"] for r in metrics(runs / "stopped")] == [
        r["step"] for r in metrics(runs / "fsdp")
    ]
    done, expected = checkpoint(runs / "stopped"), checkpoint(runs / "fsdp")
    parts = ("model", "key_encoder", "optimizer", "rng", "step")
    assert not differences({k: done[k] for k in parts}, {k: expected[k] for k in parts})


def test_fsdp_checkpoint_resumes_in_one_process_without_fsdp(runs: Path, tmp_path: Path) -> None:
    folder = runs / "stopped_copy"
    saved = checkpoint(folder)
    assert saved["args"]["fsdp"] and saved["step"] == 2
    dump = {"MOCO_EXAMPLES_DUMP_DIR": str(tmp_path)}
    result = run("moco_v3.py", *FLAGS, "--max-steps", "3", "--resume", "auto",
                 "--output-dir", str(folder), env=dump)  # fmt: skip
    assert "at step 2" in result.stdout
    loaded = torch.load(tmp_path / "rank0_loaded.pt", weights_only=True)
    assert not differences(loaded, {k: saved[k] for k in loaded})
    assert checkpoint(folder)["step"] == 3


def test_fsdp_in_one_process_trains(tmp_path: Path) -> None:
    """Without torchrun, --fsdp runs in a process group of one (it used to stop with a
    traceback from torch.distributed)."""
    run("moco_v3.py", *FLAGS, "--fsdp", "--max-steps", "2", "--output-dir", str(tmp_path))
    values = losses(tmp_path)
    assert len(values) == 2 and all(v == v and 0 < v < float("inf") for v in values), values
