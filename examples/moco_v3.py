"""MoCo v3 pre-training (ResNet or ViT) in one file, built from momentum_contrast's pieces.

    python examples/moco_v3.py                                   # built-in shapes, CPU or GPU
    python examples/moco_v3.py --arch vit_tiny                   # a small ViT on shapes
    python examples/moco_v3.py --data cifar10 --data-root data   # CIFAR-10 (downloaded there)
    torchrun --nproc-per-node 8 examples/moco_v3.py --data /data/imagenet --arch vit_small
    torchrun --nnodes 8 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        examples/moco_v3.py --data /data/imagenet --arch vit_base --fsdp --accumulate 2

Paper defaults (ImageNet): ResNet-50 with LARS, lr 0.6 x batch/256, weight decay 1e-6, T 1.0,
10 warm-up epochs, 100 epochs; ViTs with AdamW, lr 1.5e-4 x batch/256, weight decay 0.1,
T 0.2, 40 warm-up epochs, 300 epochs, a frozen random patch projection and sin-cos position
embeddings. Both: batch 4096, two symmetric views, keys from all GPUs as negatives, momentum
0.99 -> 1 on a cosine, a projector (2 layers for ResNets, 3 for ViTs) and a predictor,
SyncBatchNorm across GPUs. ``--accumulate N``: N micro-batches per process, each scored
against the keys of the whole batch.

One file, top to bottom: flags, data, kNN monitor, checkpoints, the MoCo v3 pieces and
their step (``build``, the MoCo-specific part, one screen), the loop (``main``). It is longer
than a bare loop because it keeps what the tests prove: four data sources and image
decoding, exact resume under any number of processes (every rank's random state), resume
checks, and ``--fsdp`` (about 45 lines: FSDP2 per ViT block, an unsharded replica for the
kNN monitor, and full checkpoints in the replicated run's form, the optimizer state keyed
by position, so that they move between ``--fsdp`` and DDP).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import hashlib
import json
import math
import os
import random
import sys
import time
import warnings
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from shapes import make_shapes
from torch import nn

from momentum_contrast import (
    MomentumEncoder,
    cosine_momentum,
    moco_v3_predictor,
    moco_v3_projector,
    strip_classifier,
    symmetric_contrastive_loss,
)
from momentum_contrast.augment import MoCoV3Augment
from momentum_contrast.knn import knn_predict
from momentum_contrast.optim import LARS
from momentum_contrast.vit import freeze_patch_embedding, use_sincos_position_embedding

try:  # TorchCodec decodes images; torchvision's decoders are deprecated for it since 0.29
    from torchcodec.decoders import decode_image
except ImportError:
    decode_image = None

# ---- Flags: the paper's defaults, overridden for ViTs, then for the data, then ViTs on shapes
PAPER = {
    "arch": "resnet50", "epochs": 100, "batch_size": 4096, "lr": 0.6, "image_size": 224,
    "optimizer": "lars", "weight_decay": 1e-6, "temperature": 1.0, "warmup_epochs": 10,
    "moco_momentum": 0.99, "dim": 256, "mlp_dim": 4096, "knn_bank": 50000, "knn_queries": 10000,
    "shapes_train": 4000, "shapes_val": 1000,
}  # fmt: skip
VIT = {"epochs": 300, "lr": 1.5e-4, "optimizer": "adamw", "weight_decay": 0.1,
       "temperature": 0.2, "warmup_epochs": 40}  # fmt: skip
SHAPES = {"arch": "small_cnn", "epochs": 30, "batch_size": 64, "image_size": 32,
          "temperature": 0.2, "warmup_epochs": 1, "mlp_dim": 1024, "knn_bank": 4000,
          "knn_queries": 1000}  # fmt: skip
SHAPES_VIT = {"lr": 5e-4, "warmup_epochs": 1}
# CIFAR-10/100, STL-10 (no MoCo v3 recipe exists for them): a ResNet-18 (the CIFAR stem at
# 32 px), batch 512, 200 epochs; the rest as the paper's ResNet recipe.
CIFAR = {"arch": "resnet18", "epochs": 200, "batch_size": 512, "image_size": 32}
STL = {**CIFAR, "image_size": 96, "knn_bank": 5000, "knn_queries": 8000}
DATA = {"shapes": SHAPES, "cifar10": CIFAR, "cifar100": CIFAR, "stl10": STL}
# ViTs: (layers, heads, width). vit_small is the paper's ViT-S, 12 heads (DeiT's and timm's
# have 6, as these scripts up to 0.2.0); checkpoints record the count (``num_heads``).
VITS = {"vit_tiny": (4, 3, 192), "vit_small": (12, 12, 384), "vit_base": (12, 12, 768)}
ARCHS = ("small_cnn", "resnet18", "resnet50", *VITS)
FLAGS = {  # flag: (default, help); None: from the tables above, for --data and --arch
    "data": ("shapes", "'shapes' (built in), 'cifar10', 'cifar100', 'stl10' (under --data-root) "
             "or a folder with train/ [and val/] (ImageFolder)"),
    "data_root": ("data", "--data cifar10|cifar100|stl10: where it is (downloaded if not)"),
    "arch": (None, f"backbone: {', '.join(ARCHS)}, a torchvision classification model name "
             "(e.g. mobilenet_v3_small, convnext_tiny, efficientnet_b0) or timm:NAME"),
    "epochs": (None, "number of training epochs"),
    "batch_size": (None, "total batch size over all processes"),
    "lr": (None, "base learning rate, scaled by batch/256"),
    "image_size": (None, "side of the square views, in pixels"),
    "optimizer": (None, "'lars' or 'adamw'"),
    "weight_decay": (None, "weight decay of the optimiser"),
    "temperature": (None, "temperature T of the contrastive loss"),
    "warmup_epochs": (None, "epochs of linear learning-rate warm-up"),
    "moco_momentum": (None, "start value of the key encoder's momentum (cosine to 1)"),
    "dim": (None, "output dimension of the projector and the predictor"),
    "mlp_dim": (None, "hidden width of the projector and the predictor"),
    "knn_bank": (None, "kNN monitor: training images in the bank (a fixed random subset)"),
    "knn_queries": (None, "kNN monitor: held-out images classified (a fixed random subset)"),
    "shapes_train": (None, "--data shapes: number of training images drawn"),
    "shapes_val": (None, "--data shapes: number of held-out images drawn"),
    "accumulate": (1, "N micro-batches per process whose gradients add up to one step"),
    "fsdp": (False, "ViTs: shard both encoders with FSDP2 (per transformer block, bfloat16 "
             "compute on CUDA) instead of replicating them under DDP"),
    "workers": (min(8, os.cpu_count() or 1), "loader worker processes per process (0: none)"),
    "max_steps": (0, "stop (and checkpoint) after N steps"),
    "log_every": (20, "read the losses back to the host every N steps (and at epoch ends) "
                  "for the progress bar and metrics.csv (one row per step); no read between"),
    "output_dir": ("runs/example", "checkpoints and metrics go here"),
    "resume": ("", "checkpoint path, or 'auto' (the newest in --output-dir)"),
    "seed": (0, "seed of every random choice of the run"),
    "device": ("cuda" if torch.cuda.is_available() else "cpu", "'cpu' or 'cuda' (one GPU "
               "per process under torchrun)"),
    "compile": (False, "torch.compile the encoders"),
    "augment_on": ("gpu", "'gpu': augment batched on --device; 'cpu': in the loader workers"),
    "print_config": (False, "print the resolved settings and exit"),
}  # fmt: skip


def is_vit(arch: str) -> bool:  # the ViT recipe: torchvision's vit_* and timm's ViTs
    return arch.removeprefix("timm:").startswith(("vit", "deit"))


def flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="MoCo v3 pre-training")
    for name, (default, text) in FLAGS.items():
        if isinstance(default, bool):
            p.add_argument(flag(name), action="store_true", help=text)
        else:
            kind = type(PAPER[name] if default is None else default)
            choices = ("gpu", "cpu") if name == "augment_on" else None
            p.add_argument(flag(name), type=kind, default=default, choices=choices, help=text)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = parser().parse_args(argv)
    data = DATA.get(args.data, {})  # an ImageFolder takes the paper's
    args.arch = args.arch or data.get("arch", PAPER["arch"])
    vit = is_vit(args.arch)
    shapes_vit = SHAPES_VIT if vit and args.data == "shapes" else {}
    for name, value in {**PAPER, **(VIT if vit else {}), **data, **shapes_vit}.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.print_config:
        print(json.dumps({k: v for k, v in vars(args).items() if k != "print_config"}, indent=1))
        sys.exit(0)
    return args


def fail(message: str) -> NoReturn:
    sys.exit(f"error: {message}")  # on stderr, exit status 1


def validate(args: argparse.Namespace) -> None:
    """Check every flag before anything is built: a mistake costs seconds, not an epoch."""
    world, a = int(os.environ.get("WORLD_SIZE", "1")), vars(args)
    arch, size = args.arch, args.image_size
    positive = ("batch_size", "epochs", "lr", "image_size", "dim", "mlp_dim", "knn_bank",
                "knn_queries", "shapes_train", "shapes_val", "temperature", "log_every",
                "accumulate")  # fmt: skip
    for names, ok, rule in (
        (positive, lambda v: v > 0, "must be positive"),
        (("lr", "weight_decay", "temperature"), math.isfinite, "must be finite"),
        (("max_steps", "workers", "weight_decay", "warmup_epochs"), lambda v: v >= 0,
         "must be >= 0"),
        (("moco_momentum",), lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    ):  # fmt: skip
        for name in names:
            if not ok(a[name]):
                fail(f"{flag(name)} {rule}, got {a[name]}")
    if args.optimizer not in ("lars", "adamw"):
        fail(f"--optimizer must be 'lars' or 'adamw', got {args.optimizer!r}")
    if arch.startswith("timm:"):
        try:
            import timm
        except ImportError:
            fail(f"--arch {arch}: timm is not installed (pip install timm)")
        if not timm.is_model(arch[5:]):
            fail(f"--arch {arch}: timm has no model {arch[5:]!r}")
    elif arch not in ARCHS:
        import torchvision

        if arch not in torchvision.models.list_models(module=torchvision.models):
            fail(
                f"--arch {arch} is not one of {', '.join(ARCHS)}, a torchvision "
                "classification model (e.g. mobilenet_v3_small, convnext_tiny) or timm:NAME"
            )
    local, n = args.batch_size // world, args.accumulate
    if args.batch_size % world:
        fail(f"--batch-size {args.batch_size} does not split across {world} processes")
    if local < 2:
        fail(f"--batch-size {args.batch_size} gives fewer than 2 images per process: BatchNorm")
    if local % n:
        fail(f"--accumulate {n} does not split the {local} images per process "
             f"(--batch-size {args.batch_size} over {world}) into equal micro-batches")  # fmt: skip
    if local // n < 2:
        fail(f"--accumulate {n} gives micro-batches of fewer than 2 images: BatchNorm")
    if args.fsdp and not arch.startswith("vit"):  # torchvision's ViT blocks are the units
        what = "a timm model" if arch.startswith("timm:") else "not a ViT"
        fail(f"--fsdp shards transformer blocks: --arch {arch} is {what} (use a vit_*)")
    why = None
    if arch == "small_cnn" and size < 8:
        why = "small_cnn halves the image three times: it needs at least 8 px"
    elif arch in VITS and size % (patch := 16 if size >= 128 else 8):
        why = f"{arch} uses {patch}-px patches at this size: use a multiple of {patch}"
    elif size <= 11:
        why = "the recipe's 23-px blur kernel needs at least 12 px"
    if why:
        fail(f"--image-size {size} does not fit --arch {arch}: {why}")
    if size > 4096:
        fail(f"--image-size {size}: the augmentation takes at most 4096 px")
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError):
        fail(f"--device {args.device!r} is not a device ('cpu', 'cuda')")
    if device.type not in ("cpu", "cuda"):
        fail(f"--device {args.device!r}: these scripts run on 'cpu' or 'cuda'")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {args.device}: CUDA is not available here (use --device cpu)")
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        fail(f"--output-dir {args.output_dir} is a file, not a folder")
    if args.resume not in ("", "auto") and not os.path.isfile(args.resume):
        fail(f"--resume {args.resume}: no such file")


def hashed(*values: int) -> int:
    """A 63-bit seed from e.g. (seed, rank, step)."""
    digest = hashlib.blake2b("/".join(map(str, values)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# ---- Data: uint8 images in memory or in files; each epoch's order fixed by (seed, epoch) ----
def decode(path: str) -> torch.Tensor:
    """(3, H, W) uint8 RGB; 16-bit PNGs rounded to 8 bits (257 v -> v); errors name the file."""
    try:
        if decode_image is not None:
            image = decode_image(path, mode="RGB", output_dtype="auto")
        else:
            import torchvision

            with warnings.catch_warnings():  # "superseded by TorchCodec": not installed here
                warnings.filterwarnings("ignore", ".*superseded.*TorchCodec", DeprecationWarning)
                image = torchvision.io.decode_image(path, mode=torchvision.io.ImageReadMode.RGB)
    except (RuntimeError, ValueError, OSError) as e:
        raise RuntimeError(f"cannot decode image file {path}: {e}") from e
    if image.ndim == 4:  # an animated GIF (frames, C, H, W): its first frame
        image = image[0]
    if image.dtype == torch.uint16:
        image = ((image.to(torch.int32) * 255 + 32767) // 65535).to(torch.uint8)
    return image


class Images(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """(C, H, W) uint8 images: a tensor, or file paths. With ``transform`` (--augment-on cpu)
    item ``(i, seed)`` is two views drawn from ``seed``, whichever worker makes them."""

    def __init__(self, items: Any, labels: torch.Tensor, transform: Any = None) -> None:
        self.items, self.labels, self.transform = items, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Any, int]:
        i, seed = key if isinstance(key, tuple) else (key, 0)
        item = decode(self.items[i]) if isinstance(self.items[i], str) else self.items[i]
        if self.transform is not None:
            views = self.transform(item[None], generator=torch.Generator().manual_seed(seed))
            item = tuple(v[0] for v in views)
        return item, int(self.labels[i])


def datasets(args: argparse.Namespace) -> tuple[Images, Images, int]:
    """(train, held-out, classes) for --data; without a val/ folder held-out *is* train."""
    if args.data == "shapes":
        x, y = make_shapes(args.shapes_train + args.shapes_val, args.image_size, seed=1234)
        n = args.shapes_train
        return Images(x[:n], y[:n]), Images(x[n:], y[n:]), 10
    import torchvision.datasets as tvd

    def load(cls: Any, **split: Any) -> Any:  # a copy under --data-root, else downloaded
        try:
            return cls(args.data_root, download=False, **split)
        except RuntimeError:
            try:
                return cls(args.data_root, download=True, **split)
            except Exception as e:
                fail(f"--data {args.data}: no copy under --data-root {args.data_root} and "
                     f"the download failed ({type(e).__name__}: {e})")  # fmt: skip

    if args.data == "stl10":  # pre-training on unlabeled (label -1) + train
        sets = [load(tvd.STL10, split=split) for split in ("train+unlabeled", "test")]
        pairs = [(torch.from_numpy(d.data), torch.from_numpy(d.labels).long()) for d in sets]
        return Images(*pairs[0]), Images(*pairs[1]), 10
    if args.data in ("cifar10", "cifar100"):  # (N, 32, 32, 3) -> (N, 3, 32, 32)
        cls, classes = (tvd.CIFAR10, 10) if args.data == "cifar10" else (tvd.CIFAR100, 100)
        sets = [load(cls, train=train) for train in (True, False)]
        train, test = (
            Images(torch.from_numpy(d.data.transpose(0, 3, 1, 2).copy()), torch.tensor(d.targets))
            for d in sets
        )
        return train, test, classes
    root = Path(args.data)
    if not (root / "train").is_dir():
        fail(f"--data {root} has no train/ folder (ImageFolder layout expected)")
    try:
        train = tvd.ImageFolder(str(root / "train"))
        val = tvd.ImageFolder(str(root / "val")) if (root / "val").is_dir() else None
    except FileNotFoundError as e:
        fail(f"{root} is empty or not in ImageFolder layout: {e}")
    if val is not None and val.classes != train.classes:
        fail(f"{root}/val has other classes than {root}/train")
    train_images = Images([s for s, _ in train.samples], torch.tensor(train.targets))
    val_images = Images([s for s, _ in val.samples], torch.tensor(val.targets)) if val else None
    return train_images, val_images or train_images, len(train.classes)


def epoch_order(n: int, args: argparse.Namespace, batch: int, epoch: int, start: int,
                rank: int, world: int, seeds: bool) -> list[Any]:  # fmt: skip
    """This rank's share of a permutation fixed by (seed, epoch), from batch ``start`` on: a
    resume replays the batches not trained yet, and each step holds the same images for any
    number of processes. ``seeds``: (index, seed of its views) pairs, by place in the epoch."""
    g = torch.Generator().manual_seed(args.seed * 100_003 + epoch)
    steps = n // (batch * world)
    perm = torch.randperm(n, generator=g)[: steps * batch * world].view(steps, world, batch)
    where = torch.arange(steps * world * batch).view(steps, world, batch)[start:, rank]
    pairs = zip(perm[start:, rank].flatten().tolist(), where.flatten().tolist(), strict=True)
    return [(i, hashed(args.seed, epoch, p)) if seeds else i for i, p in pairs]


def collate(batch: list[tuple[Any, int]]) -> tuple[Any, torch.Tensor]:
    """Stacked images (a list if their sizes differ), or the stacked CPU-made views."""
    items, labels = zip(*batch, strict=True)
    if isinstance(items[0], tuple):
        return tuple(torch.stack(v) for v in zip(*items, strict=True)), torch.tensor(labels)
    same = all(i.shape == items[0].shape for i in items)
    return (torch.stack(items) if same else list(items)), torch.tensor(labels)


def loader(data: Images, args: argparse.Namespace, batch: int, order: Any = None) -> Any:
    workers = 0 if isinstance(data.items, torch.Tensor) and not data.transform else args.workers
    return torch.utils.data.DataLoader(
        data, batch, sampler=order, num_workers=workers, collate_fn=collate,
        pin_memory=args.device.startswith("cuda"),
        generator=torch.Generator().manual_seed(args.seed),  # leaves the global RNG alone
    )  # fmt: skip


# ---- kNN monitor: weighted kNN top-1 of the frozen backbone ---------------------------------
@torch.no_grad()
def knn_accuracy(features: nn.Module, train: Images, val: Images, classes: int,
                 args: argparse.Namespace, device: torch.device) -> float:  # fmt: skip
    """Top-1 (%) of fixed random --knn-queries held-out images against a fixed random bank
    of --knn-bank training images (ImageFolder lists files by class: the first ones would
    be the first classes). Without val/ both come from train/, never sharing an image."""
    g = torch.Generator().manual_seed(args.seed)
    if val is train:
        perm = torch.randperm(len(train), generator=g)
        n = min(args.knn_queries, len(train) // 2)
        bank, queries = perm[n : n + min(args.knn_bank, len(train) - n)], perm[:n]
    else:  # a bank of labelled images (STL-10's unlabeled have label -1)
        labelled = (train.labels >= 0).nonzero().flatten()
        bank = labelled[torch.randperm(len(labelled), generator=g)[: args.knn_bank]]
        queries = torch.randperm(len(val), generator=g)[: args.knn_queries]
    mean = torch.tensor((0.485, 0.456, 0.406), device=device).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225), device=device).view(1, 3, 1, 1)
    was_training, embedded = features.training, []
    features.eval()
    for data, idx in ((train, bank.sort().values), (val, queries.sort().values)):
        items = data.items[idx] if isinstance(data.items, torch.Tensor) else [
            data.items[i] for i in idx.tolist()]  # fmt: skip
        out, labels = [], []
        for images, y in loader(Images(items, data.labels[idx]), args, 256):
            x = torch.cat([  # each resized to the training size
                nn.functional.interpolate(i[None].to(device).float(), size=args.image_size,
                                          mode="bilinear", antialias=True) for i in images
            ])  # fmt: skip
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                out.append(features((x / 255 - mean) / std).float())
            labels.append(y.to(device))
        embedded.append((torch.cat(out), torch.cat(labels)))
    (bank_x, bank_y), (x, y) = embedded
    features.train(was_training)
    pred = knn_predict(x, bank_x, bank_y, classes, k=min(200, len(bank_x))).argmax(1)
    return 100.0 * (pred == y).float().mean().item()


# ---- Checkpoints: a resume reads and checks one before anything is built --------------------
def attention_heads(arch: str, features: nn.Module) -> int | None:
    """A ViT's number of attention heads, which checkpoints record (no weight holds it)."""
    if arch in VITS or not is_vit(arch):
        return vit_heads(arch)
    heads = (getattr(m, "num_heads", None) for m in features.modules())
    return next((h for h in heads if isinstance(h, int)), None)


def vit_heads(arch: str) -> int | None:
    return VITS[arch][1] if arch in VITS else None


def load_resume(args: argparse.Namespace) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint of --resume, checked against the flags; None to start afresh."""
    if not args.resume:
        return None
    found = sorted(Path(args.output_dir).glob("checkpoint_*.pt"))  # checkpoint_<step>.pt
    path = Path(args.resume) if args.resume != "auto" else found[-1] if found else None
    if path is None:
        print(f"no checkpoint in {args.output_dir}: starting from scratch")
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"--resume {path} is not a checkpoint ({type(e).__name__}: {e})")
    keys = ("recipe", "step", "args", "model", "rng")
    if not isinstance(ckpt, dict) or not all(k in ckpt for k in keys):
        fail(f"--resume {path} is not a checkpoint of these scripts (keys {', '.join(keys)})")
    if ckpt["recipe"] != "moco_v3":
        fail(f"{path} is a {ckpt['recipe']} checkpoint, not moco_v3")
    saved, ours, vit = ckpt["args"], vars(args), args.arch.startswith("vit")

    def changed(*names: str) -> str:
        return ", ".join(f"{flag(n)} {ours[n]} (checkpoint: {saved[n]})" for n in names
                         if n in saved and saved[n] != ours[n])  # fmt: skip

    if differ := changed("arch", "dim", "mlp_dim", "optimizer", *["image_size"] * vit):
        fail(f"--resume {path} was trained with other settings: {differ}")  # other shapes
    if (heads := vit_heads(args.arch)) is not None and ckpt.get("num_heads") != heads:
        n = ckpt.get("num_heads")
        has = f"has {n}" if n else "does not record its (up to 0.2.0, vit_small: 6)"
        fail(f"--resume {path} {has} attention heads, --arch {args.arch} has {heads}")
    differ = changed("batch_size", "epochs", "seed", "lr", "image_size", "data", "augment_on",
                     "moco_momentum", "temperature", "weight_decay", "warmup_epochs",
                     "shapes_train", "accumulate")  # fmt: skip
    if differ and int(os.environ.get("RANK", "0")) == 0:  # the run then differs
        print(f"warning: resuming with changed {differ}", file=sys.stderr)
    return path, ckpt


# ---- The MoCo v3 pieces and their training step ---------------------------------------------
def backbone(arch: str, image_size: int) -> tuple[nn.Module, int]:
    """A randomly initialised feature extractor and the size of its features."""
    if arch == "small_cnn":  # four conv-BN-ReLU stages: quick on a CPU
        layers: list[nn.Module] = []
        for c_in, c_out in ((3, 32), (32, 64), (64, 128), (128, 256)):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out)]
            layers += [nn.ReLU(), nn.MaxPool2d(2) if c_out < 256 else nn.AdaptiveAvgPool2d(1)]
        return nn.Sequential(*layers, nn.Flatten()), 256
    if arch.startswith("timm:"):
        import timm

        return strip_classifier(timm.create_model(arch[5:], pretrained=False))
    import torchvision

    if arch in VITS:
        (depth, heads, width), patch = VITS[arch], 16 if image_size >= 128 else 8
        vit = torchvision.models.VisionTransformer(
            image_size, patch, depth, heads, width, 4 * width
        )
        return strip_classifier(vit)
    size: dict[str, Any] = {"image_size": image_size} if arch.startswith("vit_") else {}
    if arch in ("googlenet", "inception_v3"):  # features only: no auxiliary classifiers
        size |= {"aux_logits": False, "init_weights": True}  # (their default, unwarned)
    net = torchvision.models.get_model(arch, weights=None, **size)
    if arch.startswith("resnet") and image_size <= 32:  # the CIFAR stem, as the authors' demo
        net.conv1, net.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    return strip_classifier(net)


def checked_backbone(arch: str, image_size: int) -> tuple[nn.Module, int]:
    """[`backbone`][]; a torchvision or timm model that cannot be used at this size stops
    here, naming --arch, not with a traceback in the first step: a copy takes one training
    forward of 2 images (the random state kept), which must give (2, features) features."""
    if arch in ARCHS:
        return backbone(arch, image_size)
    try:
        features, dim = backbone(arch, image_size)
    except TypeError as e:  # strip_classifier does not know this model's classifier
        fail(f"--arch {arch}: {e}")
    except (AssertionError, RuntimeError, ValueError) as e:  # e.g. a ViT's patch size
        fail(f"--arch {arch} does not work at --image-size {image_size}: {e}")
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            out = copy.deepcopy(features).train()(torch.zeros(2, 3, image_size, image_size))
    except Exception as e:  # RuntimeError, or an AssertionError of timm's fixed input size
        fail(f"--arch {arch} does not work at --image-size {image_size}: {e}")
    if not isinstance(out, torch.Tensor) or out.shape != (2, dim):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        fail(f"--arch {arch} gives {got}, not (N, {dim}) features")
    return features, dim


def build(args: argparse.Namespace, env: tuple[torch.device, int, int]) -> tuple[Any, ...]:
    """The MoCo v3 pieces, the step that trains them, the augmentation, the kNN's backbone."""
    device, rank, world = env
    vit = is_vit(args.arch)
    features, feature_dim = checked_backbone(args.arch, args.image_size)
    if vit:  # the v3 ViT recipe: fixed random patch projection, fixed sin-cos positions
        freeze_patch_embedding(features)
        use_sincos_position_embedding(features)
    projector = moco_v3_projector(
        feature_dim, hidden_dim=args.mlp_dim, out_dim=args.dim, num_layers=3 if vit else 2
    )
    base = nn.Sequential(features, projector).to(device)  # what the momentum encoder follows
    predictor = moco_v3_predictor(args.dim, hidden_dim=args.mlp_dim, last_bn=vit).to(device)
    if world > 1 and device.type == "cuda":  # BatchNorm statistics over all GPUs
        base = nn.SyncBatchNorm.convert_sync_batchnorm(base)
        predictor = nn.SyncBatchNorm.convert_sync_batchnorm(predictor)
    elif world > 1 and rank == 0:  # DDP refuses SyncBatchNorm on CPU modules
        print("warning: SyncBatchNorm needs CUDA: on the CPU each process normalises its own batch")
    key_encoder = MomentumEncoder(base, momentum=args.moco_momentum)  # before any sharding
    model: Any = nn.Sequential(base, predictor)
    monitor = copy.deepcopy(features) if args.fsdp and rank == 0 else features  # see main
    if args.fsdp:  # FSDP2: each ViT block of both encoders its own unit, then each root
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        from torchvision.models.vision_transformer import EncoderBlock

        bf16 = {"param_dtype": torch.bfloat16, "reduce_dtype": torch.float32}
        policy = MixedPrecisionPolicy(**(bf16 if device.type == "cuda" else {}))
        shard = {"mesh": init_device_mesh(device.type, (world,)), "mp_policy": policy}
        for root in (model, key_encoder.key_encoder):
            for block in [m for m in root.modules() if isinstance(m, EncoderBlock)]:
                fully_shard(block, **shard)
            fully_shard(root, **shard)
    elif world > 1:
        ids = [device] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    lr = args.lr * args.batch_size / 256  # the linear scaling rule
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "lars":
        optimizer: Any = LARS(params, lr=lr, weight_decay=args.weight_decay, momentum=0.9)
    else:
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=args.weight_decay)
    augment = MoCoV3Augment(args.image_size).to(device)
    encode_q = torch.compile(model) if args.compile else model
    encode_k = torch.compile(key_encoder) if args.compile else key_encoder
    n = args.accumulate

    def sync_gradients(last: bool) -> Any:  # reduce gradients across ranks at the last only
        if args.fsdp:
            model.set_requires_gradient_sync(last)
        elif world > 1 and not last:
            return model.no_sync()
        return contextlib.nullcontext()

    def train_step(x1: torch.Tensor, x2: torch.Tensor, epoch: float) -> dict[str, Any]:
        step_lr = cosine_lr(lr, epoch, args.epochs, warmup=args.warmup_epochs)
        for group in optimizer.param_groups:
            group["lr"] = step_lr
        m = cosine_momentum(epoch, args.epochs, base=args.moco_momentum)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
        key_encoder.update(m)  # once per step, before computing the keys
        with autocast:  # the keys of the whole local batch first: (N, dim), no grad
            k1, k2 = encode_k(x1), encode_k(x2)
        optimizer.zero_grad(set_to_none=True)
        total, size = torch.zeros((), device=device), len(x1) // n
        for start in range(0, len(x1), size):  # each micro-batch against all ranks' keys
            with sync_gradients(start + size == len(x1)), autocast:
                q1, q2 = encode_q(x1[start : start + size]), encode_q(x2[start : start + size])
                loss = symmetric_contrastive_loss(
                    q1, q2, k1, k2, temperature=args.temperature, positive_offset=start
                )
            (loss / n).backward()  # gradients add up: the whole batch's
            total += loss.detach() / n
        optimizer.step()
        return {"loss": total, "lr": step_lr, "momentum": m}

    pieces = {"model": model, "key_encoder": key_encoder, "optimizer": optimizer}
    return pieces, train_step, augment, monitor


def cosine_lr(base: float, epoch: float, epochs: int, warmup: float) -> float:
    """Linear warm-up, then a half-cosine to 0."""
    if epoch < warmup:
        return base * epoch / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (epoch - warmup) / max(epochs - warmup, 1e-8)))


# ---- The loop: set-up, resume, epochs of steps, logging, kNN monitor, checkpoints -----------
FIELDS = ["step", "epoch", "loss", "lr", "momentum", "images_per_s", "knn_top1"]


def main() -> None:
    from tqdm import tqdm

    args = parse_args()
    validate(args)
    resume = load_resume(args)  # read and checked before anything is built
    if "RANK" in os.environ or args.fsdp:  # torchrun: one process per GPU; --fsdp alone: one
        one = (
            {} if "RANK" in os.environ else {"store": dist.HashStore(), "rank": 0, "world_size": 1}
        )
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo", **one)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(args.seed)  # the models are built alike on every rank
    random.seed(args.seed)
    train, val, classes = datasets(args)
    if len(train) < args.batch_size:
        fail(f"--batch-size {args.batch_size} is larger than the {len(train)} training "
             "images: no full batch to train on (lower --batch-size)")  # fmt: skip
    steps_per_epoch, batch = len(train) // args.batch_size, args.batch_size // world
    pieces, train_step, augment, monitor = build(args, (device, rank, world))
    model, key_encoder, optimizer = pieces.values()
    cpu_views = args.augment_on == "cpu"  # two views made per image in the loader workers
    views = Images(train.items, train.labels, copy.deepcopy(augment).cpu()) if cpu_views else train
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = out / "metrics.csv"
    name_of = {id(p): name for name, p in model.named_parameters()}  # --fsdp: the optimizer
    names = [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]  # positions

    def states() -> dict[str, Any]:  # every rank; --fsdp: full tensors gathered to rank 0
        if not args.fsdp:
            unwrapped = getattr(model, "module", model)  # no DDP "module." prefix
            return {"model": unwrapped.state_dict(), "key_encoder": key_encoder.state_dict(),
                    "optimizer": optimizer.state_dict()}  # fmt: skip
        from torch.distributed.checkpoint import state_dict as dcp

        full = dcp.StateDictOptions(full_state_dict=True, cpu_offload=True)
        o = dcp.get_optimizer_state_dict(model, optimizer, options=full)  # keyed by name
        at = {name: i for i, name in enumerate(names)}
        if o:  # rank 0 (the others get nothing): keyed by position, as DDP's
            groups = [{**g, "params": [at[p] for p in g["params"]]} for g in o["param_groups"]]
            o = {"state": {at[k]: v for k, v in o["state"].items()}, "param_groups": groups}
        encoders = {"model": model, "key_encoder": key_encoder}
        state = {k: dcp.get_model_state_dict(m, options=full) for k, m in encoders.items()}
        return {**state, "optimizer": o}

    def load(ckpt: dict[str, Any]) -> None:
        for part in ("model", "key_encoder"):  # older checkpoints had DDP's "module." prefix
            prefixed = ("module.", "key_encoder.module.")
            ckpt[part] = {k.replace("module.", "", 1) if k.startswith(prefixed) else k: v
                          for k, v in ckpt[part].items()}  # fmt: skip
        if not args.fsdp:
            getattr(model, "module", model).load_state_dict(ckpt["model"])
            key_encoder.load_state_dict(ckpt["key_encoder"])
            return optimizer.load_state_dict(ckpt["optimizer"])  # type: ignore[no-any-return]
        from torch.distributed.checkpoint import state_dict as dcp

        full = dcp.StateDictOptions(full_state_dict=True)  # every rank read the checkpoint
        dcp.set_model_state_dict(model, ckpt["model"], options=full)
        dcp.set_model_state_dict(key_encoder, ckpt["key_encoder"], options=full)
        o = ckpt["optimizer"]
        groups = [{**g, "params": [names[i] for i in g["params"]]} for g in o["param_groups"]]
        by_name = {"state": {names[i]: v for i, v in o["state"].items()}, "param_groups": groups}
        dcp.set_optimizer_state_dict(model, optimizer, by_name, options=full)

    def dump(state: dict[str, Any], tag: str) -> None:  # for the tests: every rank's state
        if folder := os.environ.get("MOCO_EXAMPLES_DUMP_DIR"):
            Path(folder).mkdir(parents=True, exist_ok=True)
            torch.save(state, Path(folder) / f"rank{rank}_{tag}.pt")

    def knn_now() -> float:  # on rank 0; --fsdp: every rank gathers the weights first
        if args.fsdp:  # a sharded module cannot run alone: an unsharded replica on rank 0
            from torch.distributed.checkpoint import state_dict as dcp

            full = dcp.StateDictOptions(full_state_dict=True, cpu_offload=True)
            state = dcp.get_model_state_dict(model, options=full)  # the backbone is "0.0."
            if rank == 0:
                monitor.load_state_dict({k[4:]: v for k, v in state.items() if k[:4] == "0.0."})
        return knn_accuracy(monitor, train, val, classes, args, device) if rank == 0 else 0.0

    def log(*rows: dict[str, Any], mode: str = "a") -> None:  # metrics.csv, on rank 0
        if rank == 0:
            with open(metrics, mode, newline="") as f:
                writer = csv.DictWriter(f, FIELDS)
                if mode == "w":
                    writer.writeheader()
                writer.writerows({k: r.get(k, "") for k in FIELDS} for r in rows)

    def reseed(at: int) -> None:  # torch (CPU and CUDA) and random from (seed, rank, step)
        torch.manual_seed(hashed(args.seed, rank, at))
        random.seed(hashed(args.seed, rank, at))

    step, baseline = 0, None
    if resume is not None:
        path, ckpt = resume
        load(ckpt)
        step, baseline = ckpt["step"], ckpt["knn_baseline"]
        if metrics.exists():  # drop the rows a crashed run wrote after its checkpoint
            with open(metrics, newline="") as f:
                kept = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
            log(*kept, mode="w")
        print(f"resumed from {path} at step {step}")
        dump(states(), "loaded")
    if baseline is None:
        baseline = knn_now()  # measured on rank 0 only
        if rank == 0:
            print(f"kNN top-1 at random initialisation: {baseline:.1f}%")
    if resume is None or not metrics.exists():
        log(mode="w")
    if resume is None:  # from here on each rank its own random stream
        reseed(0)
    else:  # rank r restores the generators rank r saved; a rank without any is reseeded
        saved = resume[1]["rng"] if isinstance(resume[1]["rng"], list) else [resume[1]["rng"]]
        if rank < len(saved):
            torch.set_rng_state(saved[rank]["torch"].cpu())
            random.setstate(saved[rank]["python"])
            if "cuda" in saved[rank] and device.type == "cuda":
                torch.cuda.set_rng_state(saved[rank]["cuda"].cpu(), device)
        else:
            reseed(step)
            print(f"warning: rank {rank} has no saved random state: reseeded from (seed, "
                  "rank, step)", file=sys.stderr)  # fmt: skip
        if rank == 0 and len(saved) != world:
            print(f"warning: the checkpoint holds the random states of {len(saved)} processes, "
                  f"this run has {world}: the augmentations will differ from the original "
                  "run's", file=sys.stderr)  # fmt: skip

    total = args.epochs * steps_per_epoch
    last = min(args.max_steps, total) if args.max_steps else total
    knn, pending, tick = baseline, [], time.perf_counter()

    def flush() -> dict[str, str]:  # the one host read of the losses since the last log step
        nonlocal tick
        if not pending:
            return {}
        losses = torch.stack([p[2] for p in pending]).float().tolist()
        now, steps = time.perf_counter(), len(pending)
        rate, tick = args.batch_size * steps / (now - tick), now
        log(*({"step": s, "epoch": e, "loss": repr(loss), "lr": lr, "momentum": m,
               "images_per_s": round(rate, 1)}
              for (s, e, _, lr, m), loss in zip(pending, losses, strict=True)))  # fmt: skip
        lr, m = pending[-1][3:]
        pending.clear()
        return {"loss": f"{sum(losses) / steps:.3f}", "lr": f"{lr:.3g}", "m": f"{m:.4f}",
                "img_s": f"{rate:.0f}"}  # fmt: skip

    while step < last:
        epoch, start = divmod(step, steps_per_epoch)
        order = epoch_order(len(train), args, batch, epoch, start, rank, world, cpu_views)
        bar = tqdm(loader(views, args, batch, order), total=steps_per_epoch, initial=start,
                   disable=rank != 0, mininterval=2, desc=f"epoch {epoch + 1}/{args.epochs}",
                   file=sys.stdout)  # fmt: skip
        for images, _ in bar:
            if isinstance(images, torch.Tensor):  # else a list of images, or a pair of views
                x = augment(images.to(device, non_blocking=True))
            else:
                x = [i.to(device, non_blocking=True) for i in images]
                x = x if cpu_views else augment(x)
            stats = train_step(*x, step / steps_per_epoch)  # epoch: a float
            step += 1
            pending.append((step, epoch, stats["loss"], stats["lr"], stats["momentum"]))
            if step % args.log_every == 0:
                bar.set_postfix(flush())
            if step == last or step % steps_per_epoch == 0:
                break
        bar.close()
        flush()  # the epoch's (or run's) last steps, before the kNN and the checkpoint
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)
        every: list[Any] = [rng] * world  # every rank's, in rank order
        if world > 1:
            dist.all_gather_object(every, rng)
        if step % steps_per_epoch == 0:
            knn = knn_now()
            log({"step": step, "epoch": epoch, "knn_top1": round(knn, 2)})
            if rank == 0:
                print(f"epoch {epoch + 1}: kNN top-1 {knn:.1f}%")
        state = states()  # a collective under --fsdp
        dump(state, f"{step:07d}")
        if rank == 0:  # written to a temporary file, then renamed: never a truncated one
            plot(out)
            heads = attention_heads(args.arch, monitor)
            state |= {"recipe": "moco_v3", "step": step, "rng": every, "args": vars(args),
                      "knn_baseline": baseline, "num_heads": heads}  # fmt: skip
            torch.save(state, out / "checkpoint.tmp")
            os.replace(out / "checkpoint.tmp", out / f"checkpoint_{step:07d}.pt")
            for old in out.glob("checkpoint_*.pt"):  # keep only the newest
                if old.name != f"checkpoint_{step:07d}.pt":
                    old.unlink()
    if rank == 0:
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0
        print(f"done: {step} steps; kNN top-1 {knn:.1f}% (random initialisation "
              f"{baseline:.1f}%){f'; peak GPU memory {peak:.1f} GiB' if peak else ''}; "
              f"checkpoints and metrics in {out}")  # fmt: skip


def plot(out: Path) -> None:
    """metrics.png: the loss per step and the kNN accuracy per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.plot(
        [int(r["step"]) for r in rows if r["loss"]], [float(r["loss"]) for r in rows if r["loss"]]
    )
    a.set(xlabel="step", ylabel="loss", title="pre-training loss")
    knn = [(int(r["step"]), float(r["knn_top1"])) for r in rows if r["knn_top1"]]
    b.plot([s for s, _ in knn], [v for _, v in knn], marker="o")
    b.set(xlabel="step", ylabel="kNN top-1 (%)", title="held-out kNN accuracy")
    fig.tight_layout()
    fig.savefig(out / "metrics.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
