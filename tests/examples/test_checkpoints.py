"""No checkpoint is ever lost (examples/checkpoints.py): a new run never writes over a
folder that holds one, nor into one that another run is using, nor resumes an older
checkpoint among newer ones; --resume auto and the clean-up touch only the scripts' own
numbered files (ordered by step, past 7 digits too); the newest --keep stay; a checkpoint
cut short is skipped for the one before and moved aside; a --save-every checkpoint in the
middle of an epoch resumes exactly; an --output-dir that cannot be written stops the run
before anything is built. One process, MoCo v2."""

from __future__ import annotations

import argparse
import errno
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from example_runner import (
    V12,
    checkpoint,
    damage,
    differences,
    import_examples,
    losses,
    metrics,
    run,
)

import_examples()
import checkpoints as checkpoints_module  # noqa: E402
import moco_v2  # noqa: E402
from checkpoints import checkpoints, claim, load_resume, resume_states  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _dist_workers import launch  # noqa: E402

pytestmark = pytest.mark.xdist_group("checkpoints")

STEPS = 8  # 64 images, batch 16: 4 steps an epoch, 2 epochs
FINAL = ("model", "key_encoder", "queue", "optimizer", "rng", "step")


def numbered(out: Path) -> list[str]:
    """The scripts' checkpoints in ``out``, by name (7 digits here: names sort as steps)."""
    return sorted(p.name for p in out.iterdir() if re.fullmatch(r"checkpoint_[0-9]{7}\.pt", p.name))


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


def test_a_resume_of_another_folders_checkpoint_keeps_no_rows_of_an_attempt_here(
    straight: Path, tmp_path: Path
) -> None:
    # a killed attempt that saved no checkpoint left metrics.csv rows 1-4 of another run
    rows = "".join(f"{step},0,9.{step},0.1,0.99,1.0,\n" for step in range(1, 5))
    (tmp_path / "metrics.csv").write_text(
        "step,epoch,loss,lr,momentum,images_per_s,knn_top1\n" + rows
    )
    resume = str(straight / "checkpoint_0000004.pt")
    run("moco_v2.py", *V12, "--resume", resume, "--output-dir", str(tmp_path))
    assert [int(r["step"]) for r in metrics(tmp_path) if r["loss"]] == list(range(5, STEPS + 1))
    assert losses(tmp_path) == losses(straight)[4:]  # the uninterrupted run's, from step 5


def test_a_new_run_into_a_folder_that_holds_a_run_is_refused(tmp_path: Path) -> None:
    run("moco_v2.py", *V12, "--max-steps", "2", "--output-dir", str(tmp_path))
    # the lock is taken first (a run in the folder would be named, not this one's checkpoints)
    before = {
        p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and p.name != ".lock"
    }
    result = run("moco_v2.py", *V12, "--output-dir", str(tmp_path), check=False)
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert str(tmp_path) in message and "checkpoint_0000002.pt" in message, result.stderr
    assert "--resume auto" in message and "another --output-dir" in message
    after = {
        p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and p.name != ".lock"
    }
    assert after == before  # the checkpoint and metrics.csv untouched


def test_resume_auto_and_the_clean_up_of_keep_touch_only_the_numbered_checkpoints(
    tmp_path: Path,
) -> None:
    run("moco_v2.py", *V12, "--max-steps", "1", "--output-dir", str(tmp_path))
    best = tmp_path / "checkpoint_best.pt"  # a user's own file: it sorts after the numbered
    torch.save({"note": "the user's best model"}, best)
    content = best.read_bytes()
    result = run(
        "moco_v2.py", *V12, "--max-steps", "5", "--save-every", "1", "--keep", "3",
        "--resume", "auto", "--output-dir", str(tmp_path),
    )  # fmt: skip
    assert "resumed from" in result.stdout and "at step 1" in result.stdout
    assert best.read_bytes() == content  # neither resumed from nor deleted
    assert numbered(tmp_path) == [f"checkpoint_000000{s}.pt" for s in (3, 4, 5)]  # --keep 3


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
    # the unreadable one was moved out of the way: neither resumed from again nor kept in
    # place of the new ones by the clean-up
    assert (tmp_path / "checkpoint_0000005.pt.unreadable").is_file()
    assert numbered(tmp_path) == ["checkpoint_0000006.pt", "checkpoint_0000008.pt"]


def fake(out: Path, step: int) -> Path:
    """A checkpoint of moco_v2.py at ``step``, as load_resume reads it (no weights)."""
    out.mkdir(parents=True, exist_ok=True)
    args = vars(moco_v2.parse_args([*V12]))
    path = out / f"checkpoint_{step:07d}.pt"
    torch.save({"recipe": "moco_v2", "step": step, "args": args, "model": {}, "rng": []}, path)
    return path


def resume_args(out: Path, resume: str) -> argparse.Namespace:
    return moco_v2.parse_args([*V12, "--output-dir", str(out), "--resume", resume])


CHECKS = ("moco_v2", moco_v2.MUST_MATCH, moco_v2.WARN_IF_CHANGED)


@pytest.mark.parametrize(
    ("folder_bit", "said"), [(False, "CRC-32"), (True, "marked as a folder")], ids=["crc", "folder"]
)
def test_a_damaged_checkpoint_is_skipped_for_the_one_before(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], folder_bit: bool, said: str
) -> None:
    # a byte of a tensor changed on the disk (torch.load reads no checksum; the zip's CRC-32
    # of each record tells), or the bit of the zip's directory that marks the record a
    # folder, which no CRC-32 covers: torch.load then read leftover memory as the weights
    # (NaN, 1e23) and the run diverged at its first step. Both were loaded silently.
    fake(tmp_path, 4)
    weights = torch.arange(4096, dtype=torch.float32)
    path = fake(tmp_path, 8)
    ckpt = torch.load(path, weights_only=True)
    torch.save({**ckpt, "model": {"w": weights}}, path)
    damage(path, folder_bit=folder_bit)
    assert not torch.equal(torch.load(path, weights_only=True)["model"]["w"], weights)  # silent
    resumed = load_resume(resume_args(tmp_path, "auto"), *CHECKS)
    assert resumed is not None and resumed[1]["step"] == 4
    err = capsys.readouterr().err
    assert "checkpoint_0000008.pt is not a checkpoint" in err and said in err
    assert (tmp_path / "checkpoint_0000008.pt.unreadable").is_file()
    with pytest.raises(SystemExit, match=said):  # named: no fallback
        damaged = tmp_path / "checkpoint_0000008.pt.unreadable"
        load_resume(resume_args(tmp_path / "elsewhere", str(damaged)), *CHECKS)


def test_a_checkpoint_zipped_again_with_its_folders_resumes(tmp_path: Path) -> None:
    # zip -r, or Python's zipfile, gives the folders entries of their own (marked as folders,
    # holding no data), which torch.load reads past: the file is whole
    fake(tmp_path / "saved", 8)
    saved = tmp_path / "saved" / "checkpoint_0000008.pt"
    with zipfile.ZipFile(saved) as source, zipfile.ZipFile(tmp_path / "again.pt", "w") as again:
        folder = source.namelist()[0].split("/")[0]  # torch.save's: the file's stem
        entry = zipfile.ZipInfo(f"{folder}/")  # what zip -r writes first: the folder
        entry.external_attr = 0o40755 << 16 | 0x10  # a Unix folder, and MS-DOS's folder bit
        again.writestr(entry, b"")
        for record in source.infolist():
            again.writestr(record, source.read(record))
    assert any(r.is_dir() for r in zipfile.ZipFile(tmp_path / "again.pt").infolist())
    resumed = load_resume(resume_args(tmp_path / "run", str(tmp_path / "again.pt")), *CHECKS)
    assert resumed is not None and resumed[1]["step"] == 8


def resume_each_ranks_folder() -> dict[str, Any]:
    """resume_states on each rank with the checkpoint_0000008.pt of its own folder."""
    out = Path(os.environ["MOCO_TEST_FOLDERS"]) / f"rank{dist.get_rank()}"
    path = out / "checkpoint_0000008.pt"
    env = (torch.device("cpu"), dist.get_rank(), dist.get_world_size())
    try:
        resume_states((path, torch.load(path, weights_only=True)), {}, env, 4, out,
                      load=lambda *_: None, states=dict)  # fmt: skip
    except SystemExit as e:
        return {"said": str(e)}
    return {"said": None}


@pytest.mark.parametrize("same", [True, False])
def test_ranks_that_found_other_files_of_one_name_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, same: bool
) -> None:
    """Folders local to each node: rank 1's holds another run's checkpoint of the same step
    and name. Compared by (step, name) alone, both ranks resumed, each its own weights."""
    ckpt = {"step": 8, "steps_per_epoch": 4, "knn_baseline": 1.0, "rng": []}
    (tmp_path / "rank0").mkdir()
    (tmp_path / "rank1").mkdir()
    torch.save({**ckpt, "model": {"w": torch.zeros(3)}}, tmp_path / "rank0/checkpoint_0000008.pt")
    if same:  # one file, as two nodes see it on a shared file system
        shutil.copy(tmp_path / "rank0/checkpoint_0000008.pt", tmp_path / "rank1")
    else:
        torch.save(
            {**ckpt, "model": {"w": torch.ones(3)}}, tmp_path / "rank1/checkpoint_0000008.pt"
        )
    monkeypatch.setenv("MOCO_TEST_FOLDERS", str(tmp_path))
    (ranks := tmp_path / "ranks").mkdir()
    said = [r["said"] for r in launch(resume_each_ranks_folder, 2, ranks)]
    if same:
        assert said == [None, None]
    else:
        assert all(s and "would resume from different checkpoints" in s for s in said), said


def test_resuming_a_file_that_is_no_checkpoint_stops_in_one_line(tmp_path: Path) -> None:
    (notes := tmp_path / "notes.pt").write_text('{"step": 3}')
    torch.save(torch.nn.Linear(2, 2), whole := tmp_path / "whole_model.pt")  # a pickled module
    for path in (notes, whole):
        with pytest.raises(SystemExit) as stop:
            load_resume(resume_args(tmp_path / "run", str(path)), *CHECKS)
        message = str(stop.value)
        assert "is not a checkpoint" in message and "\n" not in message, message
        assert "\x1b" not in message, message
    assert "Unsupported global: GLOBAL torch.nn.modules.linear.Linear" in message  # the cause


@pytest.mark.parametrize("short_by", [8, 300, 100_000])
def test_a_full_disk_stops_in_one_line_and_gives_the_space_back(
    tmp_path: Path, short_by: int
) -> None:
    # a real short write: a file-size limit (EFBIG) stands for the full disk (ENOSPC), the
    # file short by a few bytes (torch.save to a path then said nothing and the checkpoint
    # was cut short), some hundred (a traceback) or many (torch's "unexpected pos")
    script = (
        "import resource, signal, sys\n"
        "from pathlib import Path\n"
        "import torch\n"
        f"sys.path.insert(0, {str(Path(moco_v2.__file__).parent)!r})\n"
        "import checkpoints\n"
        "checkpoints.plot = lambda out: None\n"
        "state, env = {'model': {'w': torch.zeros(100_000)}}, (torch.device('cpu'), 0, 1)\n"
        f"whole, short = Path({str(tmp_path / 'whole')!r}), Path({str(tmp_path / 'short')!r})\n"
        "whole.mkdir(), short.mkdir()\n"
        "checkpoints.save_checkpoint(whole, state, {}, 3, env, keep=2)\n"
        f"size = (whole / 'checkpoint_0000003.pt').stat().st_size - {short_by}\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))\n"
        "checkpoints.save_checkpoint(short, state, {}, 3, env, keep=2)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    expected = r"error: cannot write the checkpoint of step 3 into .* \(is the disk full\?\): "
    why = r"(OSError: \[Errno 27\] File too large|RuntimeError: .* unexpected pos .*)"
    assert re.fullmatch(expected + why, lines[0]), lines  # torch says one or the other
    assert list((tmp_path / "short").iterdir()) == []  # no checkpoint.tmp holding the space


@pytest.mark.parametrize(
    "error, short",
    [
        (OSError(errno.ENOSPC, "No space left on device"), True),
        (OSError(errno.EIO, "Input/output error"), False),
        (KeyboardInterrupt(), False),
        (RuntimeError("a bug"), False),
    ],
)
def test_only_a_short_write_is_taken_for_a_full_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException, short: bool
) -> None:
    # raised by a write in the middle of the file, an error is followed by torch's own
    # "unexpected pos": a full disk stops in one line, anything else keeps its traceback
    class FailingFile(io.FileIO):
        def write(self, data: Any) -> int:
            if self.tell() + len(data) > 1000:
                raise error
            return super().write(data)

    monkeypatch.setattr(checkpoints_module, "plot", lambda out: None)
    monkeypatch.setattr(checkpoints_module, "open", FailingFile, raising=False)
    state, env = {"model": {"w": torch.zeros(10_000)}}, (torch.device("cpu"), 0, 1)
    expected = pytest.raises(SystemExit, match=r"\(is the disk full\?\): OSError: \[Errno 28\]")
    with expected if short else pytest.raises(type(error)) as raised:
        checkpoints_module.save_checkpoint(tmp_path, state, {}, 3, env, keep=2)
    assert short or raised.value is error
    assert list(tmp_path.iterdir()) == []  # no checkpoint.tmp left


def test_a_checkpoint_saved_without_crc32_resumes(tmp_path: Path) -> None:
    # torch.serialization.set_crc32_options(False) writes 0 for every record's CRC-32 (faster
    # saves): nothing to check, no damage to report
    path = fake(tmp_path, 4)
    ckpt = torch.load(path, weights_only=True)
    torch.serialization.set_crc32_options(False)
    try:
        torch.save({**ckpt, "model": {"w": torch.arange(4096.0)}}, path)
    finally:
        torch.serialization.set_crc32_options(True)
    resumed = load_resume(resume_args(tmp_path, "auto"), *CHECKS)
    assert resumed is not None and resumed[1]["step"] == 4


def test_a_folder_that_cannot_be_locked_warns_and_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_locks(fd: object, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))  # a mount refusing flock

    monkeypatch.setattr(checkpoints_module.fcntl, "flock", no_locks)
    held = claim(str(tmp_path))
    assert held is not None
    held.close()
    assert "cannot be locked" in capsys.readouterr().err


def test_an_older_checkpoint_is_not_resumed_into_a_folder_with_newer_ones(tmp_path: Path) -> None:
    # the run would write between the newer checkpoints (and the clean-up keep those), and a
    # later --resume auto would go back to them
    older = fake(tmp_path, 4)
    fake(tmp_path, 8)
    checks = ("moco_v2", moco_v2.MUST_MATCH, moco_v2.WARN_IF_CHANGED)
    with pytest.raises(SystemExit, match=r"holds checkpoints newer than step 4 of "
                       r"checkpoint_0000004\.pt \(up to checkpoint_0000008\.pt\)"):  # fmt: skip
        load_resume(resume_args(tmp_path, str(older)), *checks)
    # another run's checkpoint, older or newer, into this folder: the runs' checkpoints and
    # metrics would mix (a newer one was resumed there, beside this run's)
    for step in (2, 10):
        elsewhere = fake(tmp_path / "other_run", step)
        with pytest.raises(SystemExit, match=r"holds another run \(checkpoint_0000008\.pt\)"):
            load_resume(resume_args(tmp_path, str(elsewhere)), *checks)
    resumed = load_resume(resume_args(tmp_path, "auto"), *checks)
    assert resumed is not None and resumed[0] == tmp_path / "checkpoint_0000008.pt"
    assert resumed[1]["step"] == 8


def test_a_second_run_into_a_folder_in_use_stops(tmp_path: Path) -> None:
    held = claim(str(tmp_path))  # this process is the run using the folder
    assert held is not None
    try:
        second = run("moco_v2.py", *V12, "--output-dir", str(tmp_path), "--resume", "auto",
                     check=False)  # fmt: skip
        written = sorted(p.name for p in tmp_path.iterdir())
        fake(tmp_path, 4)  # the first run's first checkpoint
        # without --resume: the folder is in use (it was told to continue that run with
        # --resume auto, which then said "in use")
        third = run("moco_v2.py", *V12, "--output-dir", str(tmp_path), check=False)
    finally:
        held.close()  # what the first run's exit does, even when it is killed
    for refused in (second, third):
        assert refused.returncode != 0 and "is in use by another run" in refused.stderr
    assert f"process {os.getpid()} on" in second.stderr
    assert written == [".lock"]  # nothing else written
    again = claim(str(tmp_path))  # let go: the folder is free again
    assert again is not None
    again.close()


def test_the_lock_dies_with_the_run_not_with_the_loader_processes_it_forked(
    tmp_path: Path,
) -> None:
    # a killed run's DataLoader workers live on for seconds; a lock they inherited (flock)
    # refused the run that torchrun restarted into the folder, and the run was lost
    script = (
        "import os, sys, time\n"
        f"sys.path.insert(0, {str(Path(moco_v2.__file__).parent)!r})\n"
        "from checkpoints import claim\n"
        f"lock = claim({str(tmp_path)!r})\n"
        "child = os.fork()\n"
        "if child == 0:\n"
        "    time.sleep(60)  # a loader worker, holding the file open\n"
        "    os._exit(0)\n"
        "print(child, flush=True)\n"
        "time.sleep(60)\n"
    )
    with subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) as job:
        assert job.stdout is not None
        worker = int(job.stdout.readline())
        try:
            with pytest.raises(SystemExit, match="is in use by another run"):
                claim(str(tmp_path))  # the run lives: refused
            job.kill()  # the run dies; the worker it forked lives on
            job.wait(timeout=30)
            os.kill(worker, 0)  # still there
            again = claim(str(tmp_path))  # the restarted run takes the folder
            assert again is not None
            again.close()
        finally:
            job.kill()
            os.kill(worker, signal.SIGKILL)


def test_an_output_dir_that_cannot_be_written_stops_before_anything_is_built(
    tmp_path: Path,
) -> None:
    (tmp_path / "a_file").write_text("")
    result = run("moco_v2.py", *V12, "--output-dir", str(tmp_path / "a_file" / "run"),
                 check=False)  # fmt: skip
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "cannot write there" in result.stderr.strip().splitlines()[-1]
    assert "kNN" not in result.stdout  # stopped before the model, the data and the monitor


def test_checkpoints_are_ordered_by_step_past_seven_digits(tmp_path: Path) -> None:
    names = ["checkpoint_9999999.pt", "checkpoint_10000000.pt", "checkpoint_0000005.pt"]
    names += ["checkpoint_best.pt", "checkpoint_\u0661\u0662\u0663\u0664\u0665\u0666\u0667.pt"]
    for name in names:
        (tmp_path / name).write_text("")
    want = ["checkpoint_0000005.pt", "checkpoint_9999999.pt", "checkpoint_10000000.pt"]
    assert [p.name for p in checkpoints(tmp_path)] == want  # neither the user's nor Arabic digits


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_weights_that_diverged_are_not_saved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bad: float
) -> None:
    """A run whose weights went NaN saved them, and --keep deleted the last finite
    checkpoints: --resume auto had nothing good to go back to."""
    monkeypatch.setattr(checkpoints_module, "plot", lambda out: None)
    env = (torch.device("cpu"), 0, 1)
    good = {"model": {"w": torch.ones(4), "steps": torch.tensor(3)}, "optimizer": {"state": {}}}
    for step in (1, 2):
        checkpoints_module.save_checkpoint(tmp_path, good, {}, step, env, keep=2)
    before = sorted(tmp_path.iterdir())
    diverged = {**good, "optimizer": {"state": {0: {"momentum_buffer": torch.tensor([1.0, bad])}}}}
    with pytest.raises(SystemExit, match="the weights of step 3 hold NaN or infinite values"):
        checkpoints_module.save_checkpoint(tmp_path, diverged, {}, 3, env, keep=2)
    assert sorted(tmp_path.iterdir()) == before  # both finite checkpoints kept
