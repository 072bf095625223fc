"""What the example scripts share: flags, data, models, distributed set-up, checkpoints,
progress, metrics and the kNN monitor. The MoCo parts live in the recipe scripts."""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torchvision
from shapes import make_shapes
from torch import nn

from momentum_contrast import strip_classifier
from momentum_contrast.knn import knn_predict

ARCHS = ("small_cnn", "resnet18", "resnet50", "vit_tiny", "vit_small", "vit_base")


Defaults = list[tuple[Callable[[argparse.Namespace], bool], dict[str, Any]]]


def parse_args(description: str, layers: Defaults) -> argparse.Namespace:
    """Common flags plus the recipe's. ``layers`` are ``(applies(args), defaults)`` in order
    of priority (e.g. shapes-specific, then ViT-specific, then the paper's); a flag given on
    the command line always wins. ``--arch`` is resolved first, so layers may depend on it."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--data", default="shapes", help="'shapes' or a folder with train/ [and val/]")
    p.add_argument("--arch", choices=ARCHS)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="total over all processes")
    p.add_argument("--lr", type=float, help="base learning rate (see the recipe)")
    p.add_argument("--image-size", type=int)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--max-steps", type=int, default=0, help="stop (and checkpoint) after N steps")
    p.add_argument("--output-dir", default="runs/example")
    p.add_argument("--resume", default="", help="checkpoint path, or 'auto'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoders")
    p.add_argument(
        "--augment-on",
        choices=("gpu", "cpu"),
        default="gpu",
        help="'gpu': augment batched on --device; 'cpu': in the loader workers",
    )
    for _, values in layers:
        for name, value in values.items():
            if f"--{name.replace('_', '-')}" not in p._option_string_actions:
                p.add_argument(f"--{name.replace('_', '-')}", type=type(value))
    p.add_argument(
        "--print-config", action="store_true", help="print the resolved settings and exit"
    )
    args = p.parse_args()
    for field in ["arch"] + [n for _, values in layers for n in values if n != "arch"]:
        if getattr(args, field, None) is None:
            for applies, values in layers:
                if field in values and applies(args):
                    setattr(args, field, values[field])
                    break
    if args.print_config:
        print(json.dumps({k: v for k, v in vars(args).items() if k != "print_config"}, indent=1))
        sys.exit(0)
    return args


def setup(args: argparse.Namespace) -> tuple[torch.device, int, int]:
    """Seed, and join the process group when launched by torchrun. Returns device, rank, world."""
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
    torch.manual_seed(args.seed + rank)
    random.seed(args.seed + rank)
    return device, rank, world


def check_batch_split(batch_size: int, world: int) -> None:
    if batch_size % world:
        sys.exit(f"error: --batch-size {batch_size} does not split across {world} processes")


def backbone(arch: str, image_size: int) -> tuple[nn.Module, int]:
    """A randomly initialised feature extractor and its output size."""
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
    if arch.startswith("resnet"):
        net = getattr(torchvision.models, arch)()
        if image_size <= 32:  # tiny images: a 3x3 stem without max-pool (as CIFAR ResNets)
            net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
            net.maxpool = nn.Identity()
        return strip_classifier(net)
    patch = 16 if image_size >= 128 else 8
    layers, heads, dim = {
        "vit_tiny": (4, 3, 192),
        "vit_small": (12, 6, 384),
        "vit_base": (12, 12, 768),
    }[arch]
    vit = torchvision.models.VisionTransformer(image_size, patch, layers, heads, dim, 4 * dim)
    return strip_classifier(vit)


class Images(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """uint8 images in memory (shapes) or files on disk (ImageFolder), as (C, H, W) tensors."""

    def __init__(self, items: Any, labels: torch.Tensor, transform: Any = None) -> None:
        self.items, self.labels, self.transform = items, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        item = self.items[i]
        if isinstance(item, str):
            item = torchvision.io.decode_image(item, mode=torchvision.io.ImageReadMode.RGB)
        if self.transform is not None:  # CPU augmentation: two views made in the worker
            item = tuple(v[0] for v in self.transform(item[None]))
        return item, int(self.labels[i])


def datasets(args: argparse.Namespace) -> tuple[Images, Images, int]:
    """(train, held-out, number of classes) for --data."""
    if args.data == "shapes":
        x, y = make_shapes(args.shapes_train + args.shapes_val, args.image_size, seed=1234)
        n = args.shapes_train
        return Images(x[:n], y[:n]), Images(x[n:], y[n:]), 10
    root = Path(args.data)
    if not (root / "train").is_dir():
        sys.exit(f"error: --data {root} has no train/ folder (ImageFolder layout expected)")
    val_root = root / "val" if (root / "val").is_dir() else root / "train"
    try:
        train = torchvision.datasets.ImageFolder(str(root / "train"))
        val = torchvision.datasets.ImageFolder(str(val_root))
    except FileNotFoundError as e:  # no class folders, or no images in them
        sys.exit(f"error: {root} is empty or not in ImageFolder layout: {e}")
    as_images = lambda d: Images([s for s, _ in d.samples], torch.tensor(d.targets))  # noqa: E731
    return as_images(train), as_images(val), len(train.classes)


class EpochSampler(torch.utils.data.Sampler):  # type: ignore[type-arg]
    """This rank's share of a permutation fixed by (seed, epoch), from batch ``start`` on:
    resuming mid-epoch replays exactly the batches that were not trained yet."""

    def __init__(
        self, n: int, batch: int, seed: int, epoch: int, start: int, rank: int, world: int
    ):
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        steps = n // (batch * world)
        perm = torch.randperm(n, generator=g)[: steps * batch * world].view(steps, world, batch)
        self.indices = perm[start:, rank].flatten().tolist()

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Any:
        return iter(self.indices)


def collate(batch: list[tuple[Any, int]]) -> tuple[Any, torch.Tensor]:
    items, labels = zip(*batch, strict=True)
    if isinstance(items[0], tuple):  # CPU-augmented pairs of views
        return tuple(torch.stack(v) for v in zip(*items, strict=True)), torch.tensor(labels)
    same = all(i.shape == items[0].shape for i in items)
    return (torch.stack(items) if same else list(items)), torch.tensor(labels)


def loader(data: Images, args: argparse.Namespace, batch: int, **sampler_args: Any) -> Any:
    sampler = EpochSampler(len(data), batch, args.seed, **sampler_args) if sampler_args else None
    return torch.utils.data.DataLoader(
        data,
        batch_size=batch,
        sampler=sampler,
        num_workers=args.workers,
        collate_fn=collate,
        pin_memory=args.device.startswith("cuda"),
        drop_last=sampler is not None,
        generator=torch.Generator().manual_seed(args.seed),  # leaves the global RNG alone
    )


def to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, (list, tuple)):
        return type(x)(to_device(v, device) for v in x)
    return x.to(device, non_blocking=True)


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def evaluation_batches(data: Images, args: argparse.Namespace, device: torch.device) -> Any:
    """Held-out style batches: each image resized to the training size, normalised."""
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    size = (args.image_size, args.image_size)
    for x, y in loader(Images(data.items, data.labels), args, 256):
        images = x if isinstance(x, list) else list(x)
        resize = nn.functional.interpolate
        x = torch.cat(
            [
                resize(i[None].to(device).float(), size=size, mode="bilinear", antialias=True)
                for i in images
            ]
        )
        yield (x / 255 - mean) / std, y.to(device)


@torch.no_grad()
def knn_accuracy(
    features: nn.Module,
    train: Images,
    val: Images,
    classes: int,
    args: argparse.Namespace,
    device: torch.device,
) -> float:
    """Weighted kNN top-1 (%) of ``features`` on the held-out split."""
    was_training = features.training
    features.eval()

    def embed(data: Images, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
        out, labels = [], []
        for x, y in evaluation_batches(data, args, device):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                out.append(features(x).float())
            labels.append(y)
            if sum(len(o) for o in out) >= limit:
                break
        return torch.cat(out)[:limit], torch.cat(labels)[:limit]

    bank, bank_labels = embed(train, args.knn_bank)
    feats, labels = embed(val, args.knn_queries)
    pred = knn_predict(feats, bank, bank_labels, classes, k=min(200, len(bank))).argmax(1)
    features.train(was_training)
    return 100.0 * (pred == labels).float().mean().item()


def cosine_lr(base: float, epoch: float, epochs: int, warmup: float = 0.0) -> float:
    """Linear warm-up, then half-cosine to 0 (MoCo v2 / v3 schedules)."""
    if epoch < warmup:
        return base * epoch / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (epoch - warmup) / max(epochs - warmup, 1e-8)))
