"""What the example scripts share: distributed set-up, models and the learning-rate
schedule, plus (re-exported) the flags (``flags.py``), the data (``image_data.py``) and the kNN
monitor (``knn_monitor.py``). The MoCo parts live in the recipe scripts."""

from __future__ import annotations

import argparse
import math
import os
import random

import torch
import torch.distributed as dist
from flags import ARCHS, Defaults, check_batch_split, check_steps, parse_args, validate
from image_data import Images, collate, datasets, loader, to_device
from knn_monitor import IMAGENET_MEAN, IMAGENET_STD, evaluation_batches, knn_accuracy
from torch import nn

from momentum_contrast import strip_classifier

__all__ = [
    "ARCHS", "IMAGENET_MEAN", "IMAGENET_STD", "VITS", "Defaults", "Images", "backbone",
    "check_batch_split", "check_steps", "collate", "cosine_lr", "datasets",
    "evaluation_batches", "knn_accuracy", "loader", "parse_args", "setup", "to_device",
    "validate", "vit_heads",
]  # fmt: skip


def setup(args: argparse.Namespace) -> tuple[torch.device, int, int]:
    """Join the process group when launched by torchrun, and seed every rank alike with
    ``--seed`` (so the models, and the queue, are built identically on every rank; the
    training loop then gives each rank its own stream). Returns device, rank, world."""
    if "RANK" in os.environ and not dist.is_initialized():
        backend = "nccl" if args.device.startswith("cuda") else "gloo"
        dist.init_process_group(backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    check_batch_split(args.batch_size, world)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    return device, rank, world


# ViTs: (layers, attention heads, width). vit_small is the MoCo v3 paper's ViT-S, with 12
# heads (the authors' code too); DeiT's and timm's ViT-S have 6 (as these scripts did up to
# version 0.2.0). Checkpoints record the head count (``num_heads``), which the weights lack.
VITS = {"vit_tiny": (4, 3, 192), "vit_small": (12, 12, 384), "vit_base": (12, 12, 768)}


def vit_heads(arch: str) -> int | None:
    """The attention heads of ``arch``, or None if it is not a ViT."""
    return VITS[arch][1] if arch in VITS else None


def backbone(arch: str, image_size: int, num_heads: int | None = None) -> tuple[nn.Module, int]:
    """A randomly initialised feature extractor and its output size; ``num_heads``
    overrides a ViT's head count (a checkpoint's record)."""
    if arch == "small_cnn":  # four conv-BN-ReLU stages: quick to train on a CPU
        layers: list[nn.Module] = []
        for c_in, c_out in ((3, 32), (32, 64), (64, 128), (128, 256)):
            layers += [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(),
            ]
            layers.append(nn.MaxPool2d(2) if c_out < 256 else nn.AdaptiveAvgPool2d(1))
        return nn.Sequential(*layers, nn.Flatten()), 256
    if arch.startswith("timm:"):  # any timm model, randomly initialised
        import timm

        return strip_classifier(timm.create_model(arch[len("timm:") :], pretrained=False))
    import torchvision  # here: importing it takes a second, and small_cnn does without

    if arch not in VITS:  # any torchvision classification model, randomly initialised
        size = {"image_size": image_size} if arch.startswith("vit_") else {}
        net = torchvision.models.get_model(arch, weights=None, **size)
        if arch.startswith("resnet") and image_size <= 32:  # the CIFAR stem: 3x3, stride 1,
            net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)  # no max-pool (as the authors'
            net.maxpool = nn.Identity()  # CIFAR-10 demo)
        return strip_classifier(net)
    patch = 16 if image_size >= 128 else 8
    layers, heads, dim = VITS[arch]
    heads = heads if num_heads is None else num_heads
    vit = torchvision.models.VisionTransformer(image_size, patch, layers, heads, dim, 4 * dim)
    return strip_classifier(vit)


def cosine_lr(base: float, epoch: float, epochs: int, warmup: float = 0.0) -> float:
    """Linear warm-up, then half-cosine to 0 (MoCo v2 / v3 schedules)."""
    if epoch < warmup:
        return base * epoch / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (epoch - warmup) / max(epochs - warmup, 1e-8)))
