"""Scenarios for tests/test_ddp_exclude.py: MoCo v2 pieces inside the module DDP wraps
(a LightningModule's layout), on spawned gloo ranks."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from momentum_contrast import KeyQueue, MomentumEncoder, info_nce
from momentum_contrast.distributed import exclude_from_ddp, rank

STEPS = 3


class MoCoV2Small(nn.Module):
    """The online model, its key encoder and the queue in one module."""

    def __init__(self, ema_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.online = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8))
        self.key = MomentumEncoder(self.online, momentum=0.9, ema_dtype=ema_dtype)
        self.queue = KeyQueue(size=32, dim=8)

    def forward(
        self, x_q: torch.Tensor, x_k: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        q = F.normalize(self.online(x_q), dim=1)  # (N, 8)
        if x_k is None:  # the online branch only: DDP's own work in isolation
            return q.sum(), None
        with torch.no_grad():
            k = F.normalize(self.key(x_k), dim=1)  # (N, 8)
        return info_nce(q, k, self.queue.negatives(), temperature=0.2), k


def _rank_batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 * step + rank())  # each rank its own data
    return torch.randn(8, 6, generator=g)


def _run(exclude: bool, seed_per_rank: bool, ema_dtype: torch.dtype | None) -> dict[str, Any]:
    torch.manual_seed(rank() if seed_per_rank else 0)
    model = MoCoV2Small(ema_dtype)
    if ema_dtype is not None:
        model.to(torch.bfloat16)  # Lightning's bf16-true casts the whole module
    if exclude:
        exclude_from_ddp(model)
    ddp = nn.parallel.DistributedDataParallel(model)  # broadcast_buffers=True (default)
    opt = torch.optim.SGD(model.online.parameters(), lr=0.5)
    dtype = next(model.parameters()).dtype
    for step in range(STEPS):
        x = _rank_batch(step).to(dtype)
        loss, k = ddp(x, x.flip(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.key.update()
        model.queue.push(k)
    out: dict[str, Any] = {
        "queue": model.queue.keys.clone(),
        "key_bn": model.key.key_encoder.get_buffer("1.running_mean").clone(),
        "key": {n: p.detach().clone() for n, p in model.key.key_encoder.named_parameters()},
        "online": {n: p.detach().clone() for n, p in model.online.named_parameters()},
    }
    # A probe: rank 1 moves its queue and key statistics, then DDP runs the online branch
    # only. A broadcast (which bumps no version counter) would put rank 0's values back.
    watched = {
        "queue": model.queue.keys,
        "key_bn": model.key.key_encoder.get_buffer("1.running_mean"),
    }
    with torch.no_grad():
        for t in watched.values():
            t.add_(float(rank()))
    moved = {n: t.clone() for n, t in watched.items()}
    ddp(_rank_batch(STEPS).to(dtype))
    for n, t in watched.items():
        out[f"{n}_overwritten"] = not torch.equal(t, moved[n])
    if ema_dtype is not None:
        out["copies"] = {n: p.clone() for n, p in model.key.key_encoder.named_parameters()}
    return out


def scenario_default() -> dict[str, Any]:
    return _run(exclude=False, seed_per_rank=False, ema_dtype=None)


def scenario_excluded() -> dict[str, Any]:
    return _run(exclude=True, seed_per_rank=False, ema_dtype=None)


def scenario_excluded_bf16_unseeded() -> dict[str, Any]:
    return _run(exclude=True, seed_per_rank=True, ema_dtype=torch.float32)


def scenario_key_written_before_first_update() -> dict[str, Any]:
    """Pre-trained key weights loaded on every rank after DDP is built, before the first
    update (finding 1 of round 4: the float32 state must not be rank 0's stale one)."""
    torch.manual_seed(rank())  # ranks start apart
    model = MoCoV2Small(torch.float32).to(torch.bfloat16)
    exclude_from_ddp(model)
    nn.parallel.DistributedDataParallel(model)
    with torch.no_grad():
        model.key.key_encoder.get_parameter("0.weight").fill_(0.25)
    model.key.key_encoder.load_state_dict({"0.bias": torch.full((8,), 0.5)}, strict=False)
    model.key.update(1.0)  # m = 1: the key stays what was written
    return {"key": {n: p.clone() for n, p in model.key.key_encoder.named_parameters()}}
