"""Process-group helpers; single-process no-ops without ``torch.distributed``.

Every function here is safe to call whether or not a process group is
initialised: without one, ``rank() == 0``, ``world_size() == 1`` and
``concat_all_gather(x)`` returns ``x`` detached.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["concat_all_gather", "is_distributed", "rank", "world_size"]


def is_distributed() -> bool:
    """``True`` when ``torch.distributed`` is available and initialised.

    Examples:
        >>> from momentum_contrast.distributed import is_distributed
        >>> is_distributed()
        False
    """
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the default group, 0 without one.

    Examples:
        >>> from momentum_contrast.distributed import rank
        >>> rank()
        0
    """
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes in the default group, 1 without one.

    Examples:
        >>> from momentum_contrast.distributed import world_size
        >>> world_size()
        1
    """
    return dist.get_world_size() if is_distributed() else 1


@torch.no_grad()
def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0, in rank order, without gradient.

    Every rank must pass a tensor of the same shape.

    Args:
        x: ``(N, ...)`` tensor on this rank.

    Returns:
        ``(world_size * N, ...)`` tensor, rank 0's rows first; ``x.detach()`` when
        not distributed.

    Examples:
        >>> import torch
        >>> from momentum_contrast.distributed import concat_all_gather
        >>> concat_all_gather(torch.ones(4, 2)).shape
        torch.Size([4, 2])
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if world_size() == 1:
        return x.detach()
    x = x.detach().contiguous()
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim=0)
