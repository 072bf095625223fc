"""The code of docs/guides/accelerate.md, executed from the page, and plain loops to check it.

The tests do not copy the guide's classes and step functions: ``guide()`` runs the page's
Python blocks that define them. The plain loops below are written independently (no
Accelerate, no process group) from the library's own pieces.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from momentum_contrast import (
    KeyQueue,
    MomentumEncoder,
    cosine_momentum,
    info_nce,
    symmetric_contrastive_loss,
)

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "guides" / "accelerate.md"
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
DEFINES = ("class MoCoV2(", "class MoCoV3(", "def save_checkpoint(")


def guide_blocks() -> list[str]:
    """The page's Python blocks that define its classes and functions, in page order."""
    code = [m.group(2) for m in FENCE.finditer(GUIDE.read_text()) if m.group(1) == "python"]
    found = [block for block in code if any(d in block for d in DEFINES)]
    assert len(found) == len(DEFINES), f"{GUIDE}: expected one block per {DEFINES}"
    return found


def guide() -> dict[str, Any]:
    """MoCoV2, train_step, MoCoV3, train_step_v3, save_checkpoint, load_checkpoint."""
    namespace: dict[str, Any] = {"__name__": "accelerate_guide"}
    for i, block in enumerate(guide_blocks()):
        exec(compile(block, f"{GUIDE.name} definitions {i}", "exec"), namespace)
    return namespace


def reset_accelerate() -> None:
    """Forget the process's Accelerator state (mixed precision, accumulation steps)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def ln_model(d_in: int = 8, d_out: int = 16, seed: int = 0) -> nn.Module:
    """No BatchNorm: a sample's output does not depend on the rest of its batch."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, d_out))


def bn_model(d_in: int = 8, d_out: int = 16, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, d_out))


def batches(steps: int, n: int, d_in: int = 8, dtype: torch.dtype = torch.float32) -> list:
    """``steps`` global batches of two views, ``(n, d_in)`` each, the same in every process."""
    g = torch.Generator().manual_seed(1234)
    return [tuple(torch.randn(2, n, d_in, generator=g).to(dtype)) for _ in range(steps)]


def sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.5, momentum=0.9)


def plain_v2(
    online: nn.Module, queue_state: dict, data: list, momentum: float, temperature: float
) -> tuple[nn.Module, MomentumEncoder, KeyQueue]:
    """MoCo v2 on the whole batch, one process: the loop of add-to-your-loop.md."""
    key_encoder = MomentumEncoder(online, momentum=momentum)
    queue = KeyQueue(queue_state["keys"].shape[0], queue_state["keys"].shape[1], gather=False)
    queue = queue.to(queue_state["keys"].dtype)
    queue.load_state_dict(queue_state)
    optimizer = sgd(online.parameters())
    for x_q, x_k in data:
        k = key_encoder(x_k)
        loss = info_nce(online(x_q), k, queue.negatives(), temperature=temperature)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        key_encoder.update()
        queue.push(k)
    return online, key_encoder, queue


def plain_v3(
    base: nn.Module, predictor: nn.Module, data: list, temperature: float
) -> tuple[nn.Module, nn.Module, MomentumEncoder]:
    """MoCo v3 on the whole batch, one process, cosine momentum over len(data) steps."""
    key_encoder = MomentumEncoder(base, momentum=0.99)
    optimizer = sgd([*base.parameters(), *predictor.parameters()])
    for step, (x1, x2) in enumerate(data):
        k1, k2 = key_encoder(x1), key_encoder(x2)
        q1, q2 = predictor(base(x1)), predictor(base(x2))
        loss = symmetric_contrastive_loss(q1, q2, k1, k2, temperature=temperature, gather=False)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        key_encoder.update(cosine_momentum(step, len(data)))
    return base, predictor, key_encoder


def max_diff(a: nn.Module | dict, b: nn.Module | dict) -> float:
    """Largest absolute difference over the floating entries of two state dicts."""
    sa = a.state_dict() if isinstance(a, nn.Module) else a
    sb = b.state_dict() if isinstance(b, nn.Module) else b
    assert sa.keys() == sb.keys(), (sorted(sa), sorted(sb))
    return max(
        (sa[k].double() - sb[k].double()).abs().max().item() if sa[k].numel() else 0.0
        for k in sa
        if sa[k].is_floating_point()
    )


def equal(a: nn.Module | dict, b: nn.Module | dict) -> bool:
    """Every entry of two state dicts equal, bit for bit."""
    sa = a.state_dict() if isinstance(a, nn.Module) else a
    sb = b.state_dict() if isinstance(b, nn.Module) else b
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
