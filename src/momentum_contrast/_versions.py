"""The installed torch's version, for the features that need a newer one than the oldest
supported (private)."""

from __future__ import annotations

import re

import torch

# The oldest torch with FSDP2 (and DTensor) on the CPU as well (earlier: CUDA streams only)
# and distribute_tensor(src_data_rank=...), which the ema_dtype copies of DTensors use
FSDP2_TORCH = "2.7"


def torch_version() -> tuple[int, int]:
    """(major, minor) of the installed torch: ``"2.6.0+cpu"`` gives ``(2, 6)``."""
    found = re.match(r"(\d+)\.(\d+)", str(torch.__version__))
    if found is None:  # a build without a release number: take it as new
        return (999, 0)
    return (int(found[1]), int(found[2]))


def torch_at_least(minimum: str) -> bool:
    """Whether the installed torch is ``minimum`` (``"2.6"``) or newer."""
    major, minor = (int(part) for part in minimum.split(".")[:2])
    return torch_version() >= (major, minor)


def require_torch(minimum: str, feature: str) -> None:
    """Raise a one-line ``RuntimeError`` unless the installed torch is ``minimum`` or newer.

    >>> require_torch("2.0", "MomentumEncoder")  # any supported torch
    """
    if not torch_at_least(minimum):
        raise RuntimeError(f"{feature} needs torch>={minimum}, found {torch.__version__}")
