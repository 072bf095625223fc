"""Tensors whose dtype is chosen at construction (private): a cast of a parent module
(``model.half()``, ``model.to(torch.bfloat16)``, Lightning's ``precision="bf16-true"``)
moves them with the module but keeps their dtype."""

from __future__ import annotations

from collections.abc import Callable

import torch

Fn = Callable[[torch.Tensor], torch.Tensor]


def keeping_dtype(fn: Fn) -> Fn:
    """``fn`` for ``nn.Module._apply``, except that a cast only moves a tensor to the device
    the cast would put it on; any other ``fn`` (moves, ``to_empty``) is applied."""

    def apply(t: torch.Tensor) -> torch.Tensor:
        probe = fn(torch.empty(0, dtype=t.dtype, device=t.device))
        return fn(t) if probe.dtype == t.dtype else t.to(probe.device)

    return apply
