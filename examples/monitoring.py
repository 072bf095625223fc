"""What the examples say of a run while it trains: metrics.csv (``StepLog``: a row per step,
the losses read in one transfer every --log-every steps), metrics.png (``plot``), the kNN
monitor (``knn_accuracy``, ``KnnMonitor``: top-1 of a weighted kNN on the backbone's
features, measured on rank 0) and the last line (``report``).
"""

from __future__ import annotations

import csv
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from data import Images, evaluation_batches, knn_split
from torch import nn

from momentum_contrast.knn import knn_predict

Env = tuple[torch.device, int, int]  # (device, rank, world), as harness.setup returns it


class StepLog:
    """metrics.csv, written on rank 0 (``path`` None elsewhere): a row per step, its loss read
    with the pending ones in one transfer by ``flush``, and a row per kNN measurement. ``keep``:
    a resumed checkpoint's step (a crash's later rows are dropped). ``last``: for the bar."""

    FIELDS = ("step", "epoch", "loss", "lr", "momentum", "images_per_s", "knn_top1")

    def __init__(self, path: Path | None, every: int, batch_size: int, *, keep: int = 0) -> None:
        self.path, self.every, self.batch_size = path, every, batch_size
        self.pending: list[tuple[int, int, torch.Tensor, float, float]] = []
        self.last: dict[str, float] = {}  # the latest flush's, for the progress bar
        self.tick, kept = time.perf_counter(), []
        if path is not None and keep and path.exists():
            with open(path, newline="") as f:
                kept = [row for row in csv.DictReader(f) if int(row["step"]) <= keep]
        if path is not None:  # the kept rows into a new file, renamed over the old one: a
            path.parent.mkdir(parents=True, exist_ok=True)  # kill meanwhile loses none
            self.write(*kept, mode="w", to=path.with_name(path.name + ".tmp"))
            os.replace(path.with_name(path.name + ".tmp"), path)

    def write(self, *rows: dict[str, Any], mode: str = "a", to: Path | None = None) -> None:
        if self.path is not None:
            with open(to or self.path, mode, newline="") as f:
                writer = csv.DictWriter(f, self.FIELDS)
                if mode == "w":
                    writer.writeheader()
                writer.writerows(rows)

    def add(self, step: int, epoch: int, loss: torch.Tensor, lr: float, momentum: float) -> bool:
        """Keeps a step (its loss on the device: no host read); True: time to ``flush``."""
        self.pending.append((step, epoch, loss.detach(), lr, momentum))
        return step % self.every == 0

    def flush(self) -> None:
        if not self.pending:
            return
        stacked = torch.stack([p[2] for p in self.pending]).float()
        finite = stacked.isfinite().all().float().reshape(1)  # every rank's (a collective)
        if dist.is_initialized():  # a rank that diverged stops them all, together
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        *losses, everywhere = torch.cat([stacked, finite]).tolist()  # the one read
        now, (*_, lr, momentum) = time.perf_counter(), self.pending[-1]
        rate, self.tick = self.batch_size * len(losses) / (now - self.tick), now
        self.write(*({"step": s, "epoch": e, "loss": repr(v), "lr": r, "momentum": m,
                      "images_per_s": round(rate, 1)}
                     for (s, e, _, r, m), v in zip(self.pending, losses, strict=True)))  # fmt: skip
        self.last = {"loss": sum(losses) / len(losses), "lr": lr, "m": momentum, "img_s": rate}
        if not everywhere:  # written first: it would train on, and save NaN weights
            pending = zip(self.pending, losses, strict=True)
            mine = [f"loss {v} at step {p[0]}" for p, v in pending if not math.isfinite(v)]
            what = mine[0] if mine else f"another process's loss by step {self.pending[-1][0]}"
            sys.exit(f"error: {what}: training diverged (a smaller --lr?); the checkpoints "
                     "saved before it are kept")  # fmt: skip
        self.pending.clear()


def plot(out: Path) -> None:
    """metrics.png: the loss per step and the kNN accuracy per epoch."""
    from matplotlib.figure import Figure

    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    fig = Figure(figsize=(10, 3.5), layout="tight")
    for ax, key in zip(fig.subplots(1, 2), ("loss", "knn_top1"), strict=True):
        points = [(int(row["step"]), float(row[key])) for row in rows if row[key]]
        ax.plot(*zip(*points, strict=True), marker="o" if key == "knn_top1" else None)
        ax.set(xlabel="step", title="held-out kNN top-1 (%)" if key == "knn_top1" else key)
    fig.savefig(out / "metrics.png", dpi=100)


@torch.no_grad()
def knn_accuracy(features: nn.Module, train: Images, val: Images, classes: int, args: Any,
                 device: torch.device) -> float:  # fmt: skip
    """Weighted kNN top-1 (%) of the frozen features (k 200, as the authors' monitor) of
    --knn-queries held-out images against a bank of --knn-bank training images."""
    features.eval()
    embedded = []  # [(N, features) features, (N,) labels] of the bank, then of the queries
    chosen = knn_split(train, val, bank=args.knn_bank, queries=args.knn_queries, seed=args.seed)
    for data, idx in zip((train, val), chosen, strict=True):
        pairs = []
        for x, y in evaluation_batches(data.subset(idx), args.image_size, device):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                pairs.append((features(x).float(), y))
        embedded.append([torch.cat(part) for part in zip(*pairs, strict=True)])
    (bank, bank_labels), (queries, labels) = embedded
    features.train()
    pred = knn_predict(queries, bank, bank_labels, classes, k=min(200, len(bank))).argmax(1)
    return 100.0 * (pred == labels).float().mean().item()


class KnnMonitor:
    """The kNN monitor: [`knn_accuracy`][] of ``features``, measured on rank 0 and printed
    there (the other ranks hold 0.0). ``gather``, if given, runs first on every rank (v3's
    --fsdp: the sharded backbone into rank 0's copy, a collective)."""

    def __init__(self, features: nn.Module, data: tuple[Images, Images, int], args: Any,
                 env: Env, *, gather: Any = None) -> None:  # fmt: skip
        self.features, self.data, self.args, self.env = features, data, args, env
        self.gather, self.at, self.value = gather, -1, 0.0  # the latest: its step, its value

    def __call__(self, step: int, line: str, **fields: Any) -> float:
        """The kNN top-1 (%) at ``step``; rank 0 prints ``line`` formatted with ``fields``,
        ``step`` and ``value``."""
        (device, rank, _), (train, val, classes) = self.env, self.data
        if self.gather is not None:
            self.gather()
        value = 0.0
        if rank == 0:
            value = knn_accuracy(self.features, train, val, classes, self.args, device)
            print(line.format(step=step, value=value, **fields))
        self.at, self.value = step, value
        return value

    def final(self, step: int) -> float:
        """The kNN top-1 (%) of the weights at ``step``, where the run stops: the one measured
        at that epoch's end, else (a stop inside an epoch, or no step run) measured now."""
        if self.at == step:
            return self.value
        return self(step, "kNN top-1 at step {step}: {value:.1f}%")


def report(step: int, knn: float, baseline: float, out: Path, env: Env) -> None:
    """Rank 0's last line: the steps, the kNN at the stop and at random initialisation."""
    device, rank, _ = env
    if rank == 0:
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0
        print(f"done: {step} steps; kNN top-1 {knn:.1f}% (random initialisation {baseline:.1f}%)"
              f"{f'; peak GPU memory {peak:.1f} GiB' if peak else ''}; checkpoints and metrics "
              f"in {out}")  # fmt: skip
