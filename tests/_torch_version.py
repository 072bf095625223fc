"""The installed torch's (major, minor), for the tests of features that a newer torch than
the oldest supported brings (skip markers)."""

from __future__ import annotations

import re

import torch

# The oldest torch with FSDP2 (and DTensor) on the CPU (earlier: CUDA streams only)
FSDP2_TORCH = "2.7"


def torch_at_least(minimum: str) -> bool:
    """Whether the installed torch is ``minimum`` (``"2.6"``) or newer; a build without a
    release number (``"dev"``) counts as new."""
    found = re.match(r"(\d+)\.(\d+)", str(torch.__version__))
    have = (999, 0) if found is None else (int(found[1]), int(found[2]))
    return have >= tuple(int(part) for part in minimum.split(".")[:2])
