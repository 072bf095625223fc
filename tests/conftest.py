"""Shared test helpers: a host-device synchronisation detector and small models."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

# Under pytest-xdist every worker keeps its cores busy: torch's default (a thread per core
# in each worker) makes the workers' threads wait on each other. A worker's share of the
# cores, in the worker and in the processes it starts (the example scripts).
if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    threads = max(1, (os.cpu_count() or 1) // workers)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)

# Operators that copy a device value to the host: .item(), int(t), bool(t), torch.equal.
_SYNC_OPS = {
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.is_nonzero.default,
    torch.ops.aten.equal.default,
}


class OpRecorder(TorchDispatchMode):
    """Records every aten op; fails on those that read a tensor value on the host."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func in _SYNC_OPS:
            raise AssertionError(f"host-device synchronisation: {func}")
        self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def no_host_sync(monkeypatch: pytest.MonkeyPatch) -> Iterator[OpRecorder]:
    """Fail if the block reads a tensor's value on the host (CPU stand-in for CUDA's
    ``set_sync_debug_mode('error')``, which the GPU tests use as well)."""

    def forbidden(name: str):  # type: ignore[no-untyped-def]
        def raiser(*args, **kwargs):  # type: ignore[no-untyped-def]
            raise AssertionError(f"host-device synchronisation: Tensor.{name}()")

        return raiser

    with monkeypatch.context() as m:
        for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__"):
            m.setattr(torch.Tensor, name, forbidden(name))
        with OpRecorder() as rec:
            yield rec


class SmallCNN(nn.Module):
    """Conv + BatchNorm + pooling + linear head: the shape of a ResNet, in miniature."""

    def __init__(self, out_dim: int = 16, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(self.pool(x).flatten(1))  # (N, out_dim)


def perturb_(model: nn.Module, seed: int = 0, scale: float = 0.1) -> None:
    """Move every parameter of ``model`` by a random amount (as an optimiser step would)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device))
