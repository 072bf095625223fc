"""Whole MoCo steps on 2 gloo ranks (float64 unless said), each with its single-process
twin that computes the same thing: MoCo v3 under DDP, MoCo v2 under FSDP2 with BatchNorm,
Shuffle-BN and a queue, and the float32 EMA shadow of a bfloat16 key encoder under FSDP2.
The scenarios run on spawned ranks (``_dist_workers.launch``); the twins run in the test
process, without a process group."""

from __future__ import annotations

from typing import Any, cast

import torch
from _dist_workers import fully_shard, global_tensor
from conftest import SmallCNN
from torch import nn

from momentum_contrast import KeyQueue, MomentumEncoder, info_nce, symmetric_contrastive_loss
from momentum_contrast.distributed import batch_shuffle, batch_unshuffle, rank, world_size

STEPS, BATCH, TOKENS, WORLD = 5, 4, 4, 2  # BATCH: per rank


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Linear(12, dim)
        self.blocks = nn.Sequential(Block(dim), Block(dim))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, TOKENS, 12) -> (B, 8)
        return self.head(self.norm(self.blocks(self.embed(x))).mean(dim=1))


def shard(model: nn.Module, units: list[nn.Module], **kwargs: Any) -> None:
    """``fully_shard`` each of ``units``, then ``model``, on a mesh over all ranks."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world_size(),))
    for unit in units:
        fully_shard(unit, mesh=mesh, **kwargs)
    fully_shard(model, mesh=mesh, **kwargs)


def full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (a collective), or a plain tensor's copy."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t.detach().clone()


def v3_ddp(single: bool = False) -> dict[str, Any]:
    """Five MoCo v3 steps of TinyViT, under DDP (or, ``single``, the global batch at once)."""
    torch.manual_seed(0)
    model = TinyViT().double()
    online = model if single else nn.parallel.DistributedDataParallel(model)
    key_encoder = MomentumEncoder(online, momentum=0.9)
    optimizer = torch.optim.SGD(online.parameters(), lr=0.5, momentum=0.9)
    losses = []
    for step in range(STEPS):
        x1, x2 = global_tensor(80 + step, 2, WORLD * BATCH, TOKENS, 12)
        if not single:
            x1, x2 = (x[rank() * BATCH : (rank() + 1) * BATCH] for x in (x1, x2))
        key_encoder.update()
        k1, k2 = key_encoder(x1), key_encoder(x2)
        loss = symmetric_contrastive_loss(online(x1), online(x2), k1, k2, temperature=0.5)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    keys = {n: full(p) for n, p in key_encoder.key_encoder.named_parameters()}
    return {"losses": torch.stack(losses), "online": dict(model.state_dict()), "keys": keys}


def v2_fsdp(single: bool = False) -> dict[str, Any]:
    """Five MoCo v2 steps of SmallCNN (BatchNorm) with Shuffle-BN and a KeyQueue, both
    encoders under FSDP2. ``single``: one process reproduces every rank's BatchNorm batch:
    the queries of each rank's rows go through the model alone, and the keys of each
    rank's shuffled rows (the same permutation, from the same generator) likewise."""
    torch.manual_seed(0)
    model = SmallCNN(out_dim=8).double()
    key_encoder = MomentumEncoder(model, momentum=0.9)
    if not single:
        for net in (model, cast(SmallCNN, key_encoder.key_encoder)):
            shard(net, [net.conv1, net.bn1, net.conv2, net.bn2])
    queue = KeyQueue(24, 8, dtype=torch.float64)
    queue.keys.copy_(nn.functional.normalize(global_tensor(90, 24, 8), dim=1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    losses = []
    for step in range(STEPS):
        x_q, x_k = global_tensor(100 + step, 2, WORLD * BATCH, 3, 8, 8)
        g = torch.Generator().manual_seed(200 + step)
        key_encoder.update()
        negatives = queue.negatives()
        if single:
            perm = torch.randperm(WORLD * BATCH, generator=g)
            k = torch.empty(WORLD * BATCH, 8, dtype=torch.float64)
            loss = torch.zeros((), dtype=torch.float64)
            for r in range(WORLD):
                rows, mine = slice(r * BATCH, (r + 1) * BATCH), perm[r * BATCH : (r + 1) * BATCH]
                k[mine] = key_encoder(x_k[mine])  # rank r's Shuffle-BN batch
            for r in range(WORLD):  # each rank's own loss; the ranks' gradients averaged
                rows = slice(r * BATCH, (r + 1) * BATCH)
                loss = loss + info_nce(model(x_q[rows]), k[rows], negatives, temperature=0.2)
            loss = loss / WORLD
        else:
            rows = slice(rank() * BATCH, (rank() + 1) * BATCH)
            shuffled, idx = batch_shuffle(x_k[rows], g)
            k = batch_unshuffle(key_encoder(shuffled), idx)
            loss = info_nce(model(x_q[rows]), k, negatives, temperature=0.2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        queue.push(k)
        losses.append(loss.detach())
    params = {n: full(p) for n, p in model.named_parameters()}
    keys = {n: full(p) for n, p in key_encoder.key_encoder.named_parameters()}
    sharded = hasattr(model.conv1.weight, "full_tensor") and hasattr(
        cast(SmallCNN, key_encoder.key_encoder).conv1.weight,
        "full_tensor",  # (the roots may be unsharded)
    )
    return {"losses": torch.stack(losses), "online": params, "keys": keys, "queue": queue.keys,
            "sharded": sharded}  # fmt: skip


def bf16_shadow(single: bool = False) -> dict[str, Any]:
    """A bfloat16 TinyViT and its float32 key encoder (``ema_dtype=torch.float32``), both under
    FSDP2: 20 updates with m = 0.999, each after an elementwise change of the online
    weights (the same on shards as on whole tensors) and a forward of the key encoder
    (which leaves its root unsharded: ``update`` reshards it)."""
    torch.manual_seed(0)
    model = TinyViT().bfloat16()
    key_encoder = MomentumEncoder(model, momentum=0.999, ema_dtype=torch.float32)
    if not single:
        for net in (model, cast(TinyViT, key_encoder.key_encoder)):
            shard(net, list(net.blocks))
    x = global_tensor(110, BATCH, TOKENS, 12, dtype=torch.bfloat16)
    outputs = []
    for step in range(20):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.99).add_(0.01 * (step % 3))  # local on every shard
        outputs.append(key_encoder(x).float())
        key_encoder.update()
    keys = {n: full(p) for n, p in key_encoder.key_encoder.named_parameters()}
    state = {k: full(v) for k, v in key_encoder.state_dict().items()}
    dtensors = [hasattr(p, "full_tensor") for p in key_encoder.key_encoder.parameters()]
    return {"keys": keys, "outputs": torch.stack(outputs), "state": state,
            "sharded": bool(dtensors) and all(dtensors)}  # fmt: skip


def scenario_recipes() -> dict[str, Any]:
    return {"v3_ddp": v3_ddp(), "v2_fsdp": v2_fsdp(), "bf16_shadow": bf16_shadow()}
