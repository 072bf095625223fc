"""A warning for `MomentumEncoder.update` called twice per optimizer step (private).

Under gradient accumulation an ``update()`` placed per micro-batch (Lightning's
``on_train_batch_end``, an Accelerate loop without ``if accelerator.sync_gradients:``)
runs several times per optimizer step: the momentum compounds to ``m**k``. Between two
such calls nothing wrote the online weights. That is seen on the host, without reading a
tensor value: every in-place write bumps a tensor's version counter, and every
``torch.optim.Optimizer.step`` (fused ones too, which leave the counters alone) bumps a
counter kept here per optimizer through ``register_optimizer_step_post_hook`` (only the
optimizers holding the online parameters count). Not under ``torch.compile``, where the
update runs no host code; a step that a ``GradScaler`` skipped (fp16 overflow) warns too.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

_steps: weakref.WeakKeyDictionary[torch.optim.Optimizer, int] = weakref.WeakKeyDictionary()
_installed: list[object] = []


def _count(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    _steps[optimizer] = _steps.get(optimizer, 0) + 1


def install() -> None:
    """Count each optimizer's steps from now on (one hook per process)."""
    if not _installed:
        _installed.append(register_optimizer_step_post_hook(_count))


def steps_of(onlines: Sequence[torch.Tensor]) -> int:
    """Steps taken by the optimizers that hold any of ``onlines`` (not, say, a probe's)."""
    ids = set(map(id, onlines))
    return sum(
        n
        for opt, n in list(_steps.items())
        if any(id(p) in ids for group in opt.param_groups for p in group["params"])
    )


class UpdateGuard:
    """Warns once when an update follows the previous one with the online model unchanged."""

    def __init__(self) -> None:
        install()
        self._last: tuple[int, tuple[int, ...]] | None = None
        self.warned = False

    def check(self, onlines: Sequence[torch.Tensor]) -> None:
        now = (steps_of(onlines), tuple(t._version for t in onlines))
        if now == self._last and onlines and not self.warned:
            self.warned = True
            warnings.warn(
                "MomentumEncoder.update() ran again with the online model unchanged since "
                "the previous update (no optimizer step in between): the momentum compounds "
                "to m**2. Call it once per optimizer step: after optimizer.step(); in "
                "Lightning, in an optimizer_step override, not on_train_batch_end; in "
                "Accelerate, under `if accelerator.sync_gradients:`. (A step that a "
                "GradScaler skipped after an fp16 overflow looks the same: then ignore this.)",
                RuntimeWarning,
                stacklevel=4,
            )
        self._last = now
