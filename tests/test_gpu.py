"""CUDA-only checks: no host syncs, CUDA-graph capture, torch.compile, fused kernels, autocast.

Skipped without a CUDA device; run on a GPU with ``python -m pytest tests/test_gpu.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import cast

import pytest
import torch
import torchvision
from conftest import SmallCNN, perturb_

from momentum_contrast import (
    KeyQueue,
    MomentumEncoder,
    info_nce,
    moco_v2_head,
    symmetric_contrastive_loss,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
cuda = torch.device("cuda")


@contextlib.contextmanager
def sync_is_error() -> Iterator[None]:
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_steady_state_step_never_synchronises() -> None:
    head = moco_v2_head(32, hidden_dim=64, out_dim=16)
    model = torch.nn.Sequential(SmallCNN(out_dim=32), head).to(cuda)
    for mode in ("own", "copy", "ema"):
        enc = MomentumEncoder(model, buffers=mode)  # type: ignore[arg-type]
        queue = KeyQueue(1000, 16).to(cuda)
        empty = KeyQueue(1000, 16, init="empty", dtype=torch.bfloat16).to(cuda)
        x = torch.randn(48, 3, 16, 16, device=cuda)
        enc.update()  # first call builds the pairing cache
        with sync_is_error():
            for _ in range(3):
                q = model(x)
                k = enc(x)
                loss = info_nce(q, k, queue.negatives(), temperature=0.2)
                loss = loss + info_nce(q, k, empty.negatives()) + info_nce(q, k)
                loss = loss + symmetric_contrastive_loss(q, q, k, k)
                loss.backward()
                enc.update()
                enc.update(0.9)
                queue.push(k)
                empty.push(k)


def test_update_inside_a_cuda_graph() -> None:
    online = SmallCNN().to(cuda)
    enc = MomentumEncoder(online, momentum=0.9)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        enc.update()  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        enc.update()
    perturb_(online.cpu(), seed=3)
    online.to(cuda)  # .to() keeps the parameter objects, so the graph stays valid
    before = [p.detach().clone() for p in enc.key_encoder.parameters()]
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    for b, k, o in zip(before, enc.key_encoder.parameters(), online.parameters(), strict=True):
        expected = b
        for _ in range(3):
            expected = 0.9 * expected + 0.1 * o.detach()
        torch.testing.assert_close(k, expected, rtol=1e-5, atol=1e-6)


def test_queue_push_inside_a_cuda_graph() -> None:
    queue = KeyQueue(10, 4, normalize=False).to(cuda)
    static_keys = torch.zeros(3, 4, device=cuda)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        queue.push(static_keys)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        queue.push(static_keys)
    # the pointer lives on the device: replays keep advancing it and wrap around
    pushed = []
    for i in range(7):
        static_keys.copy_(
            torch.full((3, 4), float(i), device=cuda) + torch.arange(3.0, device=cuda)[:, None]
        )
        graph.replay()
        pushed.append(static_keys.clone())
    torch.cuda.synchronize()
    assert int(queue.ptr) == (3 + 7 * 3) % 10  # warm-up + 7 replays (capture runs nothing)
    newest = torch.cat(pushed)[-10:]
    got = sorted(map(tuple, queue.negatives().tolist()))
    assert got == sorted(map(tuple, newest.tolist()))


def test_compiled_online_model() -> None:
    model = SmallCNN().to(cuda)
    compiled = cast(torch.nn.Module, torch.compile(model))  # an OptimizedModule
    enc = MomentumEncoder(compiled, momentum=0.5)
    x = torch.randn(8, 3, 16, 16, device=cuda)
    compiled(x).sum().backward()
    before = [p.detach().clone() for p in enc.key_encoder.parameters()]
    perturb_(model.cpu(), seed=5)
    model.to(cuda)
    enc.update()
    for b, k, o in zip(before, enc.key_encoder.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(k, 0.5 * b + 0.5 * o.detach())
    assert compiled(x).shape == enc(x).shape == (8, 16)


def test_update_launches_a_handful_of_kernels_for_resnet50() -> None:
    online = torchvision.models.resnet50().to(cuda)
    enc = MomentumEncoder(online)
    enc.update()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        enc.update()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    n_params = len(list(online.parameters()))
    assert n_params == 161
    assert 0 < len(kernels) <= 8, [e.name for e in kernels]  # a loop would launch >= 161


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
def test_autocast_losses_are_float32_and_finite(amp_dtype: torch.dtype) -> None:
    proj = torch.nn.Linear(64, 128).to(cuda)
    queue = KeyQueue(65536, 128, dtype=amp_dtype).to(cuda)
    x, y = torch.randn(256, 64, device=cuda), torch.randn(256, 64, device=cuda)
    with torch.autocast("cuda", dtype=amp_dtype):
        q, k = proj(x), proj(y)
        assert q.dtype == amp_dtype
        losses = [
            info_nce(q, k, queue.negatives(), temperature=0.01),
            info_nce(q, k, temperature=0.01),
            symmetric_contrastive_loss(q, k, k, q, temperature=0.01),
        ]
    for loss in losses:
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
    cast(torch.Tensor, sum(losses)).backward()  # (sum's start, 0, types it Tensor | int)
    assert proj.weight.grad is not None
    assert torch.isfinite(proj.weight.grad).all()


def test_queue_built_under_a_cuda_default_device() -> None:
    """Lightning's init_module() and torch.set_default_device("cuda") build the queue on the
    GPU: its initial keys, drawn by a CPU generator of their own, must follow there."""
    with torch.device("cuda"):
        queue = KeyQueue(64, 8)
    assert queue.keys.device.type == "cuda" and queue.ptr.device.type == "cuda"
    assert torch.equal(queue.keys.cpu(), KeyQueue(64, 8).keys)  # the same keys everywhere
