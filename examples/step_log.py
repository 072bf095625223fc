"""Per-step metrics without a host read per step: each step's loss stays on the device
until the next log step (every ``--log-every`` steps, and at every epoch end, checkpoint
and the last step), when all of them are read back in one transfer and written to
``metrics.csv``, one row per step as before."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch


class StepLog:
    """Collects ``(step, epoch, loss, lr, momentum)``; ``flush`` reads the losses once.

    Args:
        every: log every this many steps (``--log-every``).
        batch_size: images per step over all processes, for the images/s column.
        write: called with one ``metrics.csv`` row (a dict) per step, in order.
    """

    def __init__(self, every: int, batch_size: int, write: Callable[[dict[str, Any]], None]):
        self.every, self.batch_size, self.write = every, batch_size, write
        self.pending: list[tuple[int, int, torch.Tensor, float, float]] = []
        self.tick = time.perf_counter()
        self.last: dict[str, float] = {}  # the newest flushed window, for the progress bar

    def add(self, step: int, epoch: int, loss: torch.Tensor, lr: float, momentum: float) -> None:
        """Keep this step's (0-d, on-device) loss; no host read."""
        self.pending.append((step, epoch, loss.detach(), lr, momentum))

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def flush(self) -> None:
        """Read every pending loss in one transfer and write their rows."""
        if not self.pending:
            return
        losses = torch.stack([p[2] for p in self.pending]).float().tolist()  # the one read
        now = time.perf_counter()
        rate = self.batch_size * len(self.pending) / (now - self.tick)
        self.tick = now
        for (step, epoch, _, lr, momentum), loss in zip(self.pending, losses, strict=True):
            self.write(
                {"step": step, "epoch": epoch, "loss": repr(loss), "lr": lr,
                 "momentum": momentum, "images_per_s": round(rate, 1)}
            )  # fmt: skip
        self.last = {"loss": sum(losses) / len(losses), "lr": self.pending[-1][3],
                     "momentum": self.pending[-1][4], "img_s": rate}  # fmt: skip
        self.pending.clear()
