"""A warning for `MomentumEncoder.update` called twice per optimizer step (private).

Under gradient accumulation an ``update()`` placed per micro-batch (Lightning's
``on_train_batch_end``, an Accelerate loop without ``if accelerator.sync_gradients:``)
runs several times per optimizer step: the momentum compounds to ``m**k``. Between two
such calls nothing wrote the online weights. That is seen on the host, without reading a
tensor value: every in-place write bumps a tensor's version counter, and every
``torch.optim.Optimizer.step`` (fused ones too, which leave the counters alone) bumps a
counter kept here through ``register_optimizer_step_post_hook``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

_steps = [0]  # optimizer steps taken by this process (every torch.optim.Optimizer)
_installed: list[object] = []


def _count(optimizer: Any, args: Any, kwargs: Any) -> None:
    _steps[0] += 1


def install() -> None:
    """Count optimizer steps from now on (once per process)."""
    if not _installed:
        _installed.append(register_optimizer_step_post_hook(_count))


class UpdateGuard:
    """Warns once when an update follows the previous one with the online model unchanged."""

    def __init__(self) -> None:
        install()
        self._last: tuple[int, tuple[int, ...]] | None = None
        self.warned = False

    def check(self, onlines: Sequence[torch.Tensor]) -> None:
        now = (_steps[0], tuple(t._version for t in onlines))
        if now == self._last and onlines and not self.warned:
            self.warned = True
            warnings.warn(
                "MomentumEncoder.update() ran again with the online model unchanged since "
                "the previous update (no optimizer step in between): the momentum compounds "
                "to m**2. Call it once per optimizer step: after optimizer.step(); in "
                "Lightning, in an optimizer_step override, not on_train_batch_end; in "
                "Accelerate, under `if accelerator.sync_gradients:`.",
                RuntimeWarning,
                stacklevel=4,
            )
        self._last = now
