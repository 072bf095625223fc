"""Running the example scripts from the tests: one process, or a 2-process gloo group."""

from __future__ import annotations

import csv
import math
import os
import re
import socket
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TINY = [
    "--device", "cpu", "--image-size", "32", "--batch-size", "16", "--epochs", "2",
    "--workers", "0", "--shapes-train", "64", "--shapes-val", "32", "--knn-bank", "64",
    "--knn-queries", "32",
]  # fmt: skip
V12 = [*TINY, "--queue-size", "64", "--shuffle-splits", "2"]
V3 = [*TINY, "--mlp-dim", "64", "--dim", "32"]


def write_png(image: torch.Tensor, path: Path | str) -> None:
    """Save ``(3, H, W)`` uint8 pixels as an 8-bit RGB PNG (with Pillow: torchvision's
    encoders are deprecated since torchvision 0.29)."""
    from PIL import Image

    Image.fromarray(image.permute(1, 2, 0).contiguous().numpy()).save(path)


def import_examples() -> None:
    """Make the example scripts' modules importable in the test process."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))


def run(
    script: str, *flags: str, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``examples/script`` in one process; fail the test on a non-zero exit if ``check``.
    Without ``--output-dir`` among ``flags`` the run writes into a temporary folder (the
    scripts' default, ``runs/example``, is one folder for every test: a run holds it)."""
    with tempfile.TemporaryDirectory() as folder:
        result = subprocess.run(
            [sys.executable, str(EXAMPLES / script), *flags, *_own_output_dir(flags, folder)],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=EXAMPLES,
            env={**os.environ, **(env or {})},
        )
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    if check:
        no_library_warning(result.stderr)
    return result


def no_library_warning(stderr: str) -> None:
    """The scripts use the library as meant: a warning of it (``MomentumEncoder: ...``, a
    double update, a BatchNorm converted on one side) fails the test."""
    if warned := [line for line in stderr.splitlines() if "Warning: MomentumEncoder" in line]:
        raise AssertionError(f"the library warned: {warned[0][:300]}")


def _own_output_dir(flags: tuple[str, ...], folder: str) -> list[str]:
    return [] if "--output-dir" in flags else ["--output-dir", folder]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_2p(script: str, *flags: str, env: dict[str, str] | None = None) -> str:
    """Run ``examples/script`` as 2 gloo processes (the environment torchrun sets up);
    fail the test unless both exit 0. Returns rank 0's stdout and both stderrs."""
    outputs = run_2p_ranks(script, *flags, env=env)
    return outputs[0][0] + "".join(err for _, err in outputs)


def run_2p_ranks(
    script: str, *flags: str, env: dict[str, str] | None = None
) -> list[tuple[str, str]]:
    """As [`run_2p`][], but returns ``(stdout, stderr)`` of each rank, in rank order."""
    port = str(free_port())
    folder = tempfile.TemporaryDirectory()  # the ranks' --output-dir if flags have none
    flags = (*flags, *_own_output_dir(flags, folder.name))
    procs = []
    for rank in range(2):
        rank_env = {
            **os.environ,
            **(env or {}),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "OMP_NUM_THREADS": "1",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(EXAMPLES / script), *flags],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=EXAMPLES,
                env=rank_env,
            )
        )
    with folder:
        outputs = [p.communicate(timeout=300) for p in procs]
    if any(p.returncode for p in procs):
        text = outputs[0][0] + "".join(err for _, err in outputs)
        raise AssertionError(f"{script} failed in 2 processes:\n{text[-6000:]}")
    for _, err in outputs:
        no_library_warning(err)
    return outputs


def metrics(out: Path) -> list[dict[str, str]]:
    with open(out / "metrics.csv") as f:
        return list(csv.DictReader(f))


def losses(out: Path) -> list[float]:
    """The per-step losses of ``metrics.csv``, parsed (exactly: the file holds their
    ``repr``). A NaN stays NaN, which equals nothing, itself included."""
    return [float(row["loss"]) for row in metrics(out) if row["loss"]]


KNN_LINE = re.compile(r"^kNN top-1 at random initialisation: (\d+(?:\.\d+)?)%$", re.M)
EPOCH_KNN_LINE = re.compile(r"^epoch \d+: kNN top-1 (\d+(?:\.\d+)?)%$", re.M)
STOP_KNN_LINE = re.compile(r"^kNN top-1 at step (\d+): (\d+(?:\.\d+)?)%$", re.M)
DONE_LINE = re.compile(
    r"^done: (\d+) steps; kNN top-1 (\d+(?:\.\d+)?)% \(random initialisation (\d+(?:\.\d+)?)%\)",
    re.M,
)
# The trained kNN must beat the one at random initialisation by this many points (of 100) in
# a run long enough to learn. Training with a learning rate of 1e-30 moves it too (the
# BatchNorm statistics follow the images, +2.5 points with 200 queries); learning, +5.5.
KNN_GAIN = 4.0


def knn_baselines(stdout: str) -> list[float]:
    """The kNN top-1 values (%) a run printed at random initialisation, one per line."""
    return [float(v) for v in KNN_LINE.findall(stdout)]


def knn_trained(stdout: str) -> list[float]:
    """The kNN top-1 values (%) a run printed at the end of each epoch, in order."""
    return [float(v) for v in EPOCH_KNN_LINE.findall(stdout)]


def assert_trained_sanely(
    out: Path, stdout: str, steps: int, classes: int = 10, *, learns: bool = False
) -> None:
    """``steps`` finite, positive losses in ``metrics.csv``; the kNN top-1 at random
    initialisation printed once, recorded in the checkpoint and above chance (``100 /
    classes`` %: a check of the monitor, random features tell the shapes apart; it says
    nothing of the training). Each epoch's kNN is printed as ``metrics.csv`` records it, and
    the last line reports the kNN of the weights at the stop: the last epoch's if the run
    stopped at an epoch's end, else the one measured at the stop (its own line, not in
    ``metrics.csv``). ``learns``: the run is long enough to learn, the last epoch's kNN beats
    the baseline by ``KNN_GAIN`` points."""
    values = losses(out)
    assert len(values) == steps, values
    assert all(math.isfinite(v) and v > 0 for v in values), values
    (knn,) = knn_baselines(stdout)
    assert knn > 100 / classes, stdout[-2000:]
    assert round(checkpoint(out)["knn_baseline"], 1) == knn
    trained = knn_trained(stdout)
    recorded = [float(row["knn_top1"]) for row in metrics(out) if row["knn_top1"]]  # 2 places
    assert len(recorded) == len(trained), (recorded, stdout[-2000:])
    assert all(abs(r - t) <= 0.051 for r, t in zip(recorded, trained, strict=True)), recorded
    stopped = [(int(at), float(v)) for at, v in STOP_KNN_LINE.findall(stdout)]
    epoch_ends = [int(row["step"]) for row in metrics(out) if row["knn_top1"]]
    if epoch_ends and epoch_ends[-1] == steps:  # stopped at an epoch's end: measured there
        assert not stopped, stdout[-2000:]
        final = trained[-1]
    else:  # stopped inside an epoch: measured at the stop
        assert [at for at, _ in stopped] == [steps], stdout[-2000:]
        final = stopped[0][1]
    done = DONE_LINE.search(stdout)
    assert done, stdout[-2000:]
    assert (int(done[1]), float(done[2]), float(done[3])) == (steps, final, knn)
    if learns:
        assert trained, f"no epoch ended in {steps} steps: no trained kNN\n{stdout[-2000:]}"
        assert trained[-1] >= knn + KNN_GAIN, f"kNN {trained} after training, {knn} before"


def checkpoint(out: Path) -> dict[str, Any]:
    """The newest of the scripts' checkpoints in ``out`` (checkpoint_<7 digits>.pt)."""
    found = sorted(
        p for p in out.glob("checkpoint_*.pt") if re.fullmatch(r"checkpoint_\d{7}\.pt", p.name)
    )
    assert found, f"no checkpoint in {out}"
    return dict(torch.load(found[-1], weights_only=True))


def differences(a: Any, b: Any, where: str = "") -> list[str]:
    """Where two nested structures of tensors and plain values are not exactly equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where}: keys {sorted(a.keys() ^ b.keys())[:5]}"]
        return [d for k in a for d in differences(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: lengths {len(a)} != {len(b)}"]
        return [
            d
            for i, (x, y) in enumerate(zip(a, b, strict=True))
            for d in differences(x, y, f"{where}[{i}]")
        ]
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        same = a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        return [] if same else [where]
    return [] if a == b else [f"{where}: {a!r:.60} != {b!r:.60}"]


def damage(path: Path, *, folder_bit: bool = False) -> None:
    """Change a checkpoint on the disk as a failing disk could: one byte in the middle of
    its largest record's data (which then fails its CRC-32), or with ``folder_bit`` the bit
    of that record's entry in the zip's directory that marks it a folder (which no CRC-32
    covers, and which makes torch.load read leftover memory for the record)."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        record = max(archive.infolist(), key=lambda r: r.file_size)
        at = archive.start_dir  # type: ignore[attr-defined]  # the directory's first entry
    if not folder_bit:
        start = record.header_offset  # a local header: 30 bytes, the name, the extra field
        begin = start + 30 + int.from_bytes(data[start + 26 : start + 28], "little")
        begin += int.from_bytes(data[start + 28 : start + 30], "little")
        data[begin + record.file_size // 2] ^= 0xFF
    else:
        while data[at + 46 : at + 46 + len(record.filename)] != record.filename.encode():
            n, m, k = (int.from_bytes(data[at + i : at + i + 2], "little") for i in (28, 30, 32))
            at += 46 + n + m + k  # the next entry: 46 bytes, the name, extra field, comment
        data[at + 38] |= 0x10  # the external attributes' MS-DOS folder bit
    path.write_bytes(bytes(data))
