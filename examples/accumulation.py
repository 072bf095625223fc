"""Gradient accumulation in the pre-training scripts (``--accumulate N``): the micro-batches
of a step and when their gradients are synchronised across processes.

The scripts split each process's batch into ``N`` equal, contiguous micro-batches, divide
each micro-batch's loss by ``N`` and call ``backward`` once per micro-batch; the optimizer
steps once. Without BatchNorm in the query path this is the step of the whole batch
(see docs/guides/scaling-out.md for what the recipes do with the keys and the queue).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


def micro_batches(size: int, n: int) -> list[slice]:
    """``n`` equal, contiguous row ranges of a batch of ``size`` rows, in order.

    Examples:
        >>> micro_batches(8, 2)
        [slice(0, 4, None), slice(4, 8, None)]
    """
    if n < 1 or size % n:
        raise ValueError(f"a batch of {size} rows does not split into {n} equal micro-batches")
    step = size // n
    return [slice(start, start + step) for start in range(0, size, step)]


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Around one micro-batch's forward and backward: synchronise the gradients across
    processes only when ``enabled`` (the step's last micro-batch), as DDP's ``no_sync``
    and FSDP2's ``set_requires_gradient_sync`` allow. The sum is the same either way;
    skipping the earlier reductions saves ``N - 1`` all-reduces (reduce-scatters)."""
    if isinstance(model, nn.parallel.DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
        return
    set_sync = getattr(model, "set_requires_gradient_sync", None)  # an FSDP2 module
    if set_sync is not None:
        set_sync(enabled)
    try:
        yield
    finally:
        if set_sync is not None:
            set_sync(True)
