"""MoCo v3 pre-training (ResNet or ViT), built from momentum_contrast's pieces.

    python examples/moco_v3.py                                   # built-in shapes, CPU or GPU
    python examples/moco_v3.py --arch vit_tiny                   # a small ViT on shapes
    torchrun --nproc-per-node 8 examples/moco_v3.py --data /data/imagenet --arch resnet50 \\
        --batch-size 4096 --epochs 100
    torchrun --nproc-per-node 8 examples/moco_v3.py --data /data/imagenet --arch vit_small \\
        --batch-size 4096 --epochs 300
    torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        examples/moco_v3.py --data /data/imagenet --arch vit_base --batch-size 4096
    torchrun --nnodes 8 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        examples/moco_v3.py --data /data/imagenet --arch vit_base --fsdp --batch-size 4096

Paper defaults (ImageNet): ResNet-50 with LARS, lr 0.6 x batch/256, weight decay 1e-6, T 1.0,
10 warm-up epochs; ViTs with AdamW, lr 1.5e-4 x batch/256, weight decay 0.1, T 0.2, 40
warm-up epochs, a frozen random patch projection and sin-cos position embeddings. Both: two
symmetric views, keys from all GPUs as negatives, momentum 0.99 -> 1 on a cosine, a
projector (2 layers for ResNets, 3 for ViTs) and a predictor, SyncBatchNorm across GPUs.
``--fsdp`` shards the ViT encoders with FSDP2 (see fsdp_setup.py); ``--accumulate N``
scores N micro-batches per process against the keys of the whole batch.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from accumulation import gradient_sync, micro_batches
from checkpoints import load_resume
from common import backbone, cosine_lr, datasets, parse_args, setup, validate
from flags import Defaults
from torch import nn
from training import Features, Recipe, fit

from momentum_contrast import (
    MomentumEncoder,
    cosine_momentum,
    moco_v3_predictor,
    moco_v3_projector,
    symmetric_contrastive_loss,
)
from momentum_contrast.augment import MoCoV3Augment
from momentum_contrast.optim import LARS
from momentum_contrast.vit import freeze_patch_embedding, use_sincos_position_embedding

PAPER_DEFAULTS = {
    "arch": "resnet50", "epochs": 100, "batch_size": 4096, "lr": 0.6, "image_size": 224,
    "optimizer": "lars", "weight_decay": 1e-6, "temperature": 1.0, "warmup_epochs": 10,
    "moco_momentum": 0.99, "dim": 256, "mlp_dim": 4096, "knn_bank": 50000, "knn_queries": 10000,
    "shapes_train": 4000, "shapes_val": 1000, "accumulate": 1, "fsdp": False,
}  # fmt: skip
VIT_DEFAULTS = {
    "epochs": 300, "lr": 1.5e-4, "optimizer": "adamw", "weight_decay": 0.1, "temperature": 0.2,
    "warmup_epochs": 40,
}  # fmt: skip
SHAPES_DEFAULTS = {
    "arch": "small_cnn", "epochs": 30, "batch_size": 64, "image_size": 32, "temperature": 0.2,
    "warmup_epochs": 1, "mlp_dim": 1024, "knn_bank": 4000, "knn_queries": 1000,
}  # fmt: skip
SHAPES_VIT_DEFAULTS = {"lr": 5e-4, "warmup_epochs": 1}


def on_shapes(args: argparse.Namespace) -> bool:
    """The built-in data."""
    return bool(args.data == "shapes")


def is_vit(args: argparse.Namespace) -> bool:
    """A ViT backbone."""
    return bool(args.arch.startswith("vit"))


# CIFAR-10/100 and STL-10 (no MoCo v3 recipe exists for them): a ResNet-18 (with the CIFAR
# stem at 32 px), batch 512, 200 epochs; the rest as the paper's ResNet recipe.
SMALL_DEFAULTS = {
    "arch": "resnet18", "epochs": 200, "batch_size": 512, "image_size": 32,
    "knn_bank": 50000, "knn_queries": 10000,
}  # fmt: skip
STL_DEFAULTS = {**SMALL_DEFAULTS, "image_size": 96, "knn_bank": 5000, "knn_queries": 8000}
LAYERS: Defaults = [
    (lambda a: on_shapes(a) and is_vit(a), SHAPES_VIT_DEFAULTS),
    (on_shapes, SHAPES_DEFAULTS),
    (lambda a: a.data in ("cifar10", "cifar100"), SMALL_DEFAULTS),
    (lambda a: a.data == "stl10", STL_DEFAULTS),
    (is_vit, VIT_DEFAULTS),
    (lambda a: True, PAPER_DEFAULTS),
]


def build(args: argparse.Namespace, env: tuple[torch.device, int, int]) -> Recipe:
    """The MoCo v3 pieces for ``args`` and the training step that uses them."""
    device, rank, world = env
    vit = is_vit(args)
    features, feature_dim = backbone(args.arch, args.image_size)
    if vit:  # the v3 ViT recipe: fixed random patch projection, fixed sin-cos positions
        freeze_patch_embedding(features)
        use_sincos_position_embedding(features)
    projector = moco_v3_projector(
        feature_dim, hidden_dim=args.mlp_dim, out_dim=args.dim, num_layers=3 if vit else 2
    )
    base = nn.Sequential(features, projector).to(device)  # what the momentum encoder follows
    predictor = moco_v3_predictor(args.dim, hidden_dim=args.mlp_dim, last_bn=vit).to(device)
    if world > 1 and device.type == "cuda":  # BatchNorm statistics over all GPUs (reference)
        base = nn.SyncBatchNorm.convert_sync_batchnorm(base)
        predictor = nn.SyncBatchNorm.convert_sync_batchnorm(predictor)
    elif world > 1 and rank == 0:  # DDP refuses SyncBatchNorm on CPU modules
        print("warning: SyncBatchNorm needs CUDA: on the CPU each process normalises its own batch")
    key_encoder = MomentumEncoder(base, momentum=args.moco_momentum)  # before any sharding
    query: nn.Module = nn.Sequential(base, predictor)
    monitor: Features = features
    if args.fsdp:  # shard both encoders; the optimizer then holds the shards
        from fsdp_setup import FullModelState, FullOptimizerState, gathered_features, shard

        monitor = gathered_features(query, features, rank)
        shard([query, key_encoder.key_encoder], device, world)
    elif world > 1:
        query = nn.parallel.DistributedDataParallel(
            query, device_ids=[device] if device.type == "cuda" else None
        )
    lr = args.lr * args.batch_size / 256  # linear scaling rule
    params = [p for p in query.parameters() if p.requires_grad]
    if args.optimizer == "lars":
        optimizer: torch.optim.Optimizer = LARS(
            params, lr=lr, weight_decay=args.weight_decay, momentum=0.9
        )
    else:
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=args.weight_decay)
    augment = MoCoV3Augment(args.image_size).to(device)
    encode_q = torch.compile(query) if args.compile else query
    encode_k = torch.compile(key_encoder) if args.compile else key_encoder
    n = args.accumulate

    def train_step(
        x1: torch.Tensor, x2: torch.Tensor, epoch: float
    ) -> dict[str, float | torch.Tensor]:
        step_lr = cosine_lr(lr, epoch, args.epochs, warmup=args.warmup_epochs)
        for group in optimizer.param_groups:
            group["lr"] = step_lr
        m = cosine_momentum(epoch, args.epochs, base=args.moco_momentum)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
        key_encoder.update(m)  # once per step, before computing the keys
        with autocast:  # the keys of the whole local batch first: (N, dim), no grad
            k1, k2 = encode_k(x1), encode_k(x2)
        optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=device)
        for rows in micro_batches(len(x1), n):  # each scored against all keys of all ranks
            with gradient_sync(query, rows.stop == len(x1)), autocast:
                q1, q2 = encode_q(x1[rows]), encode_q(x2[rows])  # (N / n, dim) predictions
                loss = symmetric_contrastive_loss(
                    q1, q2, k1, k2, temperature=args.temperature, positive_offset=rows.start
                )
            (loss / n).backward()  # gradients add up: the whole batch's
            total += loss.detach() / n
        optimizer.step()
        return {"loss": total, "lr": step_lr, "momentum": m}

    stateful: dict[str, Any] = {"model": query, "key_encoder": key_encoder, "optimizer": optimizer}
    if args.fsdp:  # full (unsharded) state dicts, gathered to rank 0
        stateful = {
            "model": FullModelState(query),
            "key_encoder": FullModelState(key_encoder),
            "optimizer": FullOptimizerState(query, optimizer),
        }
    return Recipe(stateful, train_step, augment, monitor)


def main() -> None:
    """Parse the flags, build the MoCo v3 pieces and train."""
    args = parse_args("MoCo v3 pre-training", LAYERS)
    validate(args, blur=True)
    resume = load_resume(args, "moco_v3")  # checked before anything is built
    env = setup(args)
    fit(args, "moco_v3", *build(args, env), datasets(args), env, resume)


if __name__ == "__main__":
    main()
