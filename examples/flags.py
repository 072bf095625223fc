"""The example scripts' flags: the parser, the layered defaults, and checks made up front.

Every flag is checked before a model or a dataset is built, and a bad value stops the run
with ``error: --flag ...`` (exit status 1), so a mistake costs seconds, not an epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import torch

ARCHS = ("small_cnn", "resnet18", "resnet50", "vit_tiny", "vit_small", "vit_base")
BLUR_KERNEL = 23  # the augmentation recipes' Gaussian kernel: it needs images of 12 px or more

Defaults = list[tuple[Callable[[argparse.Namespace], bool], dict[str, Any]]]

# Help of the flags that the recipes' defaults tables generate (one entry per name).
HELP = {
    "arch": "backbone architecture",
    "epochs": "number of training epochs",
    "batch_size": "total batch size over all processes",
    "lr": "base learning rate (see the recipe)",
    "image_size": "side of the square training views, in pixels",
    "queue_size": "number of keys K in the queue of negatives",
    "moco_momentum": "momentum m of the key encoder (v3: its start value, cosine to 1)",
    "dim": "output dimension of the head (the keys' dimension)",
    "mlp_dim": "hidden width of the v3 projector and predictor",
    "weight_decay": "weight decay of the optimiser",
    "schedule_milestones": "comma-separated epochs where the step schedule divides lr by 10",
    "shuffle_splits": "single process only: BatchNorm sub-batches of the key encoder "
    "(Shuffle-BN emulated with SplitBatchNorm); unused under torchrun",
    "knn_bank": "kNN monitor: training images in the bank (a fixed random subset)",
    "knn_queries": "kNN monitor: held-out images classified (a fixed random subset)",
    "shapes_train": "--data shapes: number of training images drawn",
    "shapes_val": "--data shapes: number of held-out images drawn",
    "crop_min": "smallest area fraction of the random resized crop",
    "blur_p": "probability of the Gaussian blur per view",
    "optimizer": "'lars' or 'adamw'",
    "temperature": "temperature T of the contrastive loss (v1/v2: the paper's unless given)",
    "warmup_epochs": "epochs of linear learning-rate warm-up",
    "accumulate": "split each process's batch into N micro-batches whose gradients add up "
    "to one optimiser step (the step of the whole --batch-size; exact without BatchNorm, "
    "see docs/guides/scaling-out.md)",
    "fsdp": "ViTs only: shard both encoders with FSDP2 (fully_shard per transformer block, "
    "bfloat16 compute on CUDA) instead of replicating them under DDP",
    "pretrained": "checkpoint to evaluate (required): one of these scripts', the MoCo "
    "authors' v1/v2/v3, or a backbone state dict (then give --arch)",
}

# Checked up front: positive, or at least zero.
POSITIVE = ("batch_size", "epochs", "lr", "image_size", "queue_size", "dim", "mlp_dim")
POSITIVE += ("knn_bank", "knn_queries", "shapes_train", "shapes_val", "shuffle_splits")
POSITIVE += ("temperature", "log_every", "accumulate")
NON_NEGATIVE = ("max_steps", "workers", "weight_decay", "warmup_epochs")
FRACTIONS = ("moco_momentum", "blur_p", "crop_min")


def fail(message: str) -> NoReturn:
    """Stop the script with ``error: message`` on stderr and exit status 1."""
    sys.exit(f"error: {message}")


def flag(name: str) -> str:
    """``batch_size`` -> ``--batch-size``."""
    return f"--{name.replace('_', '-')}"


def build_parser(description: str, layers: Defaults) -> argparse.ArgumentParser:
    """The common flags plus one flag per name in the recipe's defaults tables."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--data",
        default="shapes",
        help="'shapes' (built in), 'cifar10', 'cifar100', 'stl10' (torchvision, under "
        "--data-root) or a folder with train/ [and val/] (ImageFolder)",
    )
    p.add_argument(
        "--data-root",
        default="data",
        help="--data cifar10|cifar100|stl10: where the dataset is (downloaded there if not)",
    )
    p.add_argument(
        "--arch",
        help=f"backbone: {', '.join(ARCHS)}, any torchvision classification model name "
        "(e.g. mobilenet_v3_small, convnext_tiny, efficientnet_b0) or timm:NAME",
    )
    p.add_argument("--epochs", type=int, help=HELP["epochs"])
    p.add_argument("--batch-size", type=int, help=HELP["batch_size"])
    p.add_argument("--lr", type=float, help=HELP["lr"])
    p.add_argument("--image-size", type=int, help=HELP["image_size"])
    p.add_argument(
        "--workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="data loader worker processes per process (0: load in the main process)",
    )
    p.add_argument("--max-steps", type=int, default=0, help="stop (and checkpoint) after N steps")
    p.add_argument(
        "--log-every",
        type=int,
        default=20,
        help="pre-training: read the losses back to the host every N steps (and at epoch "
        "ends) for the progress bar and metrics.csv (one row per step); no read in between",
    )
    p.add_argument("--output-dir", default="runs/example", help="checkpoints and metrics go here")
    p.add_argument("--resume", default="", help="checkpoint path, or 'auto' (newest in output)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice of the run")
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="'cpu' or 'cuda' (one GPU per process under torchrun)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the encoders")
    p.add_argument(
        "--augment-on",
        choices=("gpu", "cpu"),
        default="gpu",
        help="'gpu': augment batched on --device; 'cpu': in the loader workers",
    )
    for _, values in layers:
        for name, value in values.items():
            if flag(name) in p._option_string_actions:
                continue
            if isinstance(value, bool):  # a switch; None until the layers fill it in
                p.add_argument(flag(name), action="store_true", default=None, help=HELP[name])
            else:
                p.add_argument(flag(name), type=type(value), help=HELP[name])
    p.add_argument(
        "--print-config", action="store_true", help="print the resolved settings and exit"
    )
    return p


def parse_args(
    description: str, layers: Defaults, argv: list[str] | None = None
) -> argparse.Namespace:
    """Common flags plus the recipe's. ``layers`` are ``(applies(args), defaults)`` in order
    of priority (e.g. shapes-specific, then ViT-specific, then the paper's); a flag given on
    the command line always wins. ``--arch`` is resolved first, so layers may depend on it."""
    args = build_parser(description, layers).parse_args(argv)
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


def launched_world_size() -> int:
    """Processes of this run, as torchrun (or any launcher) announces in ``WORLD_SIZE``."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_batch_split(batch_size: int, world: int) -> None:
    """The total batch must split evenly across the processes."""
    if batch_size % world:
        fail(f"--batch-size {batch_size} does not split across {world} processes")


def check_steps(images: int, batch_size: int) -> int:
    """Full batches per epoch; an error naming --batch-size when there is none."""
    if images < batch_size:
        fail(
            f"--batch-size {batch_size} is larger than the {images} training images: "
            "no full batch to train on (lower --batch-size)"
        )
    return images // batch_size


def check_accumulate(args: argparse.Namespace, world: int) -> None:
    """``--accumulate N``: each process's batch splits into N micro-batches of 2 or more
    images (BatchNorm), and each micro-batch into the ``--shuffle-splits`` sub-batches."""
    n = getattr(args, "accumulate", 1)
    if n is None or n == 1:
        return
    local = args.batch_size // world
    if local % n:
        fail(
            f"--accumulate {n} does not split the {local} images per process "
            f"(--batch-size {args.batch_size} over {world}) into equal micro-batches"
        )
    if local // n < 2:
        fail(f"--accumulate {n} gives micro-batches of fewer than 2 images: BatchNorm")
    splits = getattr(args, "shuffle_splits", None) or 1
    if world == 1 and (local // n) % splits:
        fail(
            f"--accumulate {n} gives micro-batches of {local // n} images, which do not "
            f"split into --shuffle-splits {splits} BatchNorm sub-batches"
        )


def check_arch(arch: str) -> None:
    """``--arch``: a built-in name, a torchvision classification model or ``timm:NAME``."""
    if arch in ARCHS:
        return
    if arch.startswith("timm:"):
        try:
            import timm
        except ImportError:
            fail(f"--arch {arch}: timm is not installed (pip install timm)")
        if not timm.is_model(arch[len("timm:") :]):
            fail(f"--arch {arch}: timm has no model {arch[len('timm:') :]!r}")
        return
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if arch not in known:
        fail(
            f"--arch {arch} is not one of {', '.join(ARCHS)}, a torchvision classification "
            "model (e.g. mobilenet_v3_small, convnext_tiny, efficientnet_b0) or timm:NAME"
        )


def min_image_size(arch: str, image_size: int, blur: bool) -> str | None:
    """Why ``--image-size`` does not fit ``arch`` (and the blur), or None if it does."""
    if arch == "small_cnn" and image_size < 8:
        return "small_cnn halves the image three times: it needs at least 8 px"
    if arch.startswith("vit") and arch in ARCHS:  # the built-in ViTs' patch sizes
        patch = 16 if image_size >= 128 else 8
        if image_size % patch:
            return f"{arch} uses {patch}-px patches at this size: use a multiple of {patch}"
    if blur and image_size <= BLUR_KERNEL // 2:
        return f"the recipe's {BLUR_KERNEL}-px blur kernel needs at least {BLUR_KERNEL // 2 + 1} px"
    return None


def validate(args: argparse.Namespace, *, blur: bool) -> None:
    """Check every flag before anything is built; ``blur``: the recipe blurs its views."""
    world = launched_world_size()
    values = vars(args)
    for name in POSITIVE:
        if values.get(name) is not None and values[name] <= 0:
            fail(f"{flag(name)} must be positive, got {values[name]}")
    for name in NON_NEGATIVE:
        if values.get(name) is not None and values[name] < 0:
            fail(f"{flag(name)} must be >= 0, got {values[name]}")
    for name in FRACTIONS:
        if values.get(name) is not None and not 0 <= values[name] <= 1:
            fail(f"{flag(name)} must be in [0, 1], got {values[name]}")
    if values.get("crop_min") == 0:
        fail("--crop-min must be in (0, 1], got 0")
    if values.get("optimizer") is not None and args.optimizer not in ("lars", "adamw"):
        fail(f"--optimizer must be 'lars' or 'adamw', got {args.optimizer!r}")
    if values.get("schedule_milestones") is not None:
        try:
            [int(m) for m in args.schedule_milestones.split(",")]
        except ValueError:
            fail(f"--schedule-milestones must be integers, got {args.schedule_milestones!r}")
    check_arch(args.arch)
    check_batch_split(args.batch_size, world)
    if world == 1 and args.batch_size % values.get("shuffle_splits", 1):
        fail(
            f"--batch-size {args.batch_size} does not split into --shuffle-splits "
            f"{args.shuffle_splits} BatchNorm sub-batches"
        )
    if args.batch_size // world < 2:
        fail(f"--batch-size {args.batch_size} gives fewer than 2 images per process: BatchNorm")
    check_accumulate(args, world)
    if values.get("fsdp") and not args.arch.startswith("vit"):
        fail(f"--fsdp shards transformer blocks: --arch {args.arch} is not a ViT (use a vit_*)")
    reason = min_image_size(args.arch, args.image_size, blur)
    if reason:
        fail(f"--image-size {args.image_size} does not fit --arch {args.arch}: {reason}")
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError):
        fail(f"--device {args.device!r} is not a device ('cpu', 'cuda')")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {args.device}: CUDA is not available here (use --device cpu)")
    if args.resume not in ("", "auto") and not os.path.isfile(args.resume):
        fail(f"--resume {args.resume}: no such file")
