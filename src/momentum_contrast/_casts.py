"""Buffers whose dtype is chosen at construction (private): a cast of a parent module
(``model.half()``, ``model.to(torch.bfloat16)``, Lightning's ``precision="bf16-true"``)
moves them with the module but keeps their dtype."""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["apply_keeping_dtype"]


def apply_keeping_dtype(
    buffers: dict[str, torch.Tensor | None], fn: Callable[[torch.Tensor], torch.Tensor]
) -> None:
    """``nn.Module._apply`` for ``buffers``: a function that changes the dtype (a cast)
    only moves each buffer to its device; any other (moves, ``to_empty``) is applied."""
    for name, buf in buffers.items():
        if buf is None:
            continue
        probe = fn(torch.empty(0, dtype=buf.dtype, device=buf.device))
        buffers[name] = fn(buf) if probe.dtype == buf.dtype else buf.to(probe.device)
