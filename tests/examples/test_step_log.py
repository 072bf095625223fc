"""The training loop reads no tensor back to the host between log steps: each step's loss
stays on the device until every --log-every steps (and the epoch's end), then all are read
in one transfer; metrics.csv still has one row per step."""

from __future__ import annotations

import csv
import inspect
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from example_runner import TINY, V12, import_examples

import_examples()
import moco_v2  # noqa: E402
from monitoring import StepLog  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _dist_workers import launch  # noqa: E402

READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


# Where the step's device tensors live: the loop, the recipe, the run's helpers and the library.
# (The loader reads its own CPU tensors, labels and indices, by design: no device value there.)
DEVICE_SIDE = ("moco_v2.py", "harness.py", "monitoring.py", "checkpoints.py")


def on_device_side(path: str) -> bool:
    return Path(path).name in DEVICE_SIDE or "momentum_contrast" in Path(path).parts


@pytest.fixture
def host_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, str]]]:
    """Every host read of a tensor value in the loop, the recipe or the library, as
    ``(training steps done, caller's file)``."""
    reads: list[tuple[int, str]] = []
    done = [0]
    for name in READS:
        original = getattr(torch.Tensor, name)

        def reader(self, *args, __original=original, **kwargs):  # type: ignore[no-untyped-def]
            caller = inspect.stack(context=0)[1].filename
            if on_device_side(caller):
                reads.append((done[0], Path(caller).name))
            return __original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, reader)
    build = moco_v2.build

    def counting_build(*args):  # type: ignore[no-untyped-def]
        stateful, train_step, *rest = build(*args)

        def step(*a):  # type: ignore[no-untyped-def]
            out = train_step(*a)
            done[0] += 1
            return out

        return (stateful, step, *rest)

    monkeypatch.setattr(moco_v2, "build", counting_build)
    yield reads


def test_no_host_read_between_log_steps(
    host_reads: list[tuple[int, str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 64 images, batch 16: 4 steps an epoch, 2 epochs; log every 3 steps
    argv = [*V12, "--log-every", "3", "--output-dir", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", ["moco_v2.py", *argv])
    host_reads.clear()
    moco_v2.main("v2")
    in_loop = [(step, where) for step, where in host_reads if step > 0]
    allowed = {3, 4, 6, 8}  # log steps (every 3rd) and epoch ends (4, 8)
    assert in_loop, "no read at all: the losses were never logged"
    for step, where in in_loop:
        assert step in allowed, f"host read after step {step} in {where}"
    assert {s for s, w in in_loop if w in DEVICE_SIDE} == {3, 4, 6, 8}
    with open(tmp_path / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["loss"]]
    assert [int(r["step"]) for r in rows] == list(range(1, 9))  # one row per step
    assert all(float(r["loss"]) > 0 for r in rows)


def test_step_log_reads_once_per_flush(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    log = StepLog(tmp_path / "metrics.csv", every=5, batch_size=8)

    def rows() -> list[dict[str, str]]:
        with open(tmp_path / "metrics.csv") as f:
            return [row for row in csv.DictReader(f) if row["loss"]]

    reads: list[int] = []
    original = torch.Tensor.tolist

    def counting_tolist(t: torch.Tensor) -> Any:
        reads.append(1)
        return original(t)

    monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)
    losses = [torch.tensor(float(i)) / 3 for i in range(1, 8)]
    for step, loss in enumerate(losses[:4], start=1):
        assert not log.add(step, 0, loss, 0.1, 0.99)  # not yet due
    assert reads == [] and rows() == []
    assert log.add(5, 0, losses[4], 0.1, 0.99)  # due: every 5th step
    log.flush()
    assert reads == [1]
    assert [int(r["step"]) for r in rows()] == [1, 2, 3, 4, 5]
    assert [float(r["loss"]) for r in rows()] == [float(x) for x in losses[:5]]  # exact
    assert log.last["loss"] == pytest.approx(sum(float(x) for x in losses[:5]) / 5)
    log.flush()  # nothing pending: no read
    assert reads == [1]


def test_log_every_must_be_positive() -> None:
    from example_runner import run

    result = run("moco_v2.py", *TINY, "--log-every", "0", check=False)
    assert result.returncode != 0
    assert "error: argument --log-every: must be positive, got 0" in result.stderr


def test_a_resumed_log_loses_no_row_when_killed_while_it_rewrites(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # a resumed run keeps the rows up to its checkpoint's step and drops a crash's later
    # ones; killed while it writes them back (seconds for a million rows), the old file stays
    path = tmp_path / "metrics.csv"
    log = StepLog(path, every=1, batch_size=8)
    for step in range(1, 11):
        log.add(step, 0, torch.tensor(1.0 / step), 0.1, 0.99)
    log.flush()
    before = path.read_text()

    def killed(self: csv.DictWriter[str], rows: Any) -> None:
        raise KeyboardInterrupt  # stands for the SIGKILL halfway through the rewrite

    monkeypatch.setattr(csv.DictWriter, "writerows", killed)
    with pytest.raises(KeyboardInterrupt):
        StepLog(path, every=1, batch_size=8, keep=6)
    assert path.read_text() == before  # all ten rows: the resume after it keeps six of them
    monkeypatch.undo()
    StepLog(path, every=1, batch_size=8, keep=6)
    with open(path) as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(1, 7))


def test_a_diverged_loss_stops_the_run_after_writing_its_row(tmp_path: Path) -> None:
    """A NaN loss trained on (every later step NaN) and the kNN monitor printed an accuracy
    of NaN weights."""
    log = StepLog(tmp_path / "metrics.csv", every=3, batch_size=8)
    for step, loss in enumerate([1.0, float("nan"), 2.0], start=1):
        log.add(step, 0, torch.tensor(loss), 0.1, 0.99)
    with pytest.raises(SystemExit, match="loss nan at step 2: training diverged"):
        log.flush()
    with open(tmp_path / "metrics.csv") as f:
        assert [r["loss"] for r in csv.DictReader(f)] == ["1.0", "nan", "2.0"]


def diverged_on_rank_1() -> dict[str, Any]:
    log = StepLog(None, every=2, batch_size=8)
    log.add(1, 0, torch.tensor(1.0), 0.1, 0.99)
    log.add(2, 0, torch.tensor(float("nan") if dist.get_rank() == 1 else 2.0), 0.1, 0.99)
    try:
        log.flush()
    except SystemExit as e:
        return {"said": str(e)}
    return {"said": None}


def test_a_rank_that_diverged_stops_every_rank(tmp_path: Path) -> None:
    """Each rank looked at its own losses: rank 1 stopped, and rank 0 trained on into its
    next collective (a "Connection closed by peer", or a wait until the NCCL timeout)."""
    rank0, rank1 = launch(diverged_on_rank_1, 2, tmp_path)
    assert rank1["said"].startswith("error: loss nan at step 2: training diverged")
    assert rank0["said"].startswith("error: another process's loss by step 2: training diverged")
