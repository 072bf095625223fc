"""MoCo v2 (and v1) pre-training in one file, built from momentum_contrast's pieces.

    python examples/moco_v2.py                                   # built-in shapes, CPU or GPU
    python examples/moco_v2.py --data cifar10 --data-root data   # the authors' CIFAR-10 demo
    python examples/moco_v2.py --data /data/imagenet --arch resnet50           # one GPU
    torchrun --nproc-per-node 8 examples/moco_v2.py --data /data/imagenet --arch resnet50
    torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        examples/moco_v2.py --data /data/imagenet --arch resnet50 --batch-size 1024 --lr 0.12
    python examples/moco_v2.py --resume auto                     # continue the last run
    python examples/moco_v2.py --accumulate 2                    # 2 micro-batches per step

On ImageNet the defaults are the paper's (ResNet-50, 200 epochs, batch 256, SGD lr 0.03,
K 65,536, m 0.999, T 0.2, cosine schedule); CIFAR and STL-10 get the authors' CIFAR-10 demo
settings, the built-in `shapes` data settings that finish on a CPU in minutes. Read top to
bottom: flags, set-up, data, the MoCo pieces and their step, the loop's helpers (step log, kNN
monitor, checkpoints), the loop. One file: copy it, and change what you need. The MoCo
part (``build``) is one screen; the rest is longer than a bare loop because it keeps what the
tests prove: every flag checked up front, four data sources and image decoding, exact resume
under any number of processes (every rank's random state) and the resume checks.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import functools
import hashlib
import importlib.util
import json
import math
import os
import random
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from shapes import make_shapes
from torch import nn

from momentum_contrast import KeyQueue, MomentumEncoder, info_nce
from momentum_contrast.augment import MoCoV1Augment, MoCoV2Augment
from momentum_contrast.distributed import batch_shuffle, batch_unshuffle
from momentum_contrast.heads import moco_v1_head, moco_v2_head, strip_classifier
from momentum_contrast.knn import knn_predict
from momentum_contrast.norm import convert_split_batchnorm

# ---- Flags: the paper's defaults, replaced by a data set's recipe, replaced by the command line
PAPER = {
    "arch": "resnet50", "epochs": 200, "batch_size": 256, "lr": 0.03, "image_size": 224,
    "queue_size": 65536, "moco_momentum": 0.999, "dim": 128, "weight_decay": 1e-4,
    "schedule_milestones": "120,160", "shuffle_splits": 8, "knn_bank": 50000, "knn_queries": 10000,
    "shapes_train": 4000, "shapes_val": 1000, "crop_min": 0.2, "blur_p": 0.5, "accumulate": 1,
}  # fmt: skip
SHAPES = {  # 32-px images: gentler crops, no blur (as the CIFAR recipes)
    "arch": "small_cnn", "epochs": 30, "batch_size": 64, "lr": 0.06, "image_size": 32,
    "queue_size": 1024, "moco_momentum": 0.99, "schedule_milestones": "20,25", "crop_min": 0.5,
    "blur_p": 0.0, "knn_bank": 4000, "knn_queries": 1000,
}  # fmt: skip
# The MoCo authors' CIFAR-10 demo: ResNet-18 with a CIFAR stem, batch 512, K 4,096, m 0.99,
# T 0.1, SGD lr 0.06 on a cosine schedule, weight decay 5e-4, crops of 8-100%, no blur.
CIFAR = {
    "arch": "resnet18", "epochs": 200, "batch_size": 512, "lr": 0.06, "image_size": 32,
    "queue_size": 4096, "moco_momentum": 0.99, "temperature": 0.1, "weight_decay": 5e-4,
    "crop_min": 0.08, "blur_p": 0.0, "knn_bank": 50000, "knn_queries": 10000,
}  # fmt: skip
RECIPES = {"shapes": SHAPES, "cifar10": CIFAR, "cifar100": CIFAR,  # any other --data: PAPER
           "stl10": {**CIFAR, "image_size": 96, "knn_bank": 5000, "knn_queries": 8000}}  # fmt: skip
ARCHS = ("small_cnn", "resnet18", "resnet50", "vit_tiny", "vit_small", "vit_base")


# fmt: off
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="MoCo v1/v2 pre-training")
    arg = p.add_argument
    arg("--data", default="shapes", help="'shapes' (built in), 'cifar10', 'cifar100', 'stl10' "
        "(under --data-root) or a folder with train/ [and val/] (ImageFolder)")
    arg("--data-root", default="data", help="cifar10|cifar100|stl10: where it is (or goes)")
    arg("--arch", help=f"backbone: {', '.join(ARCHS)}, any torchvision classification model "
        "(e.g. mobilenet_v3_small, convnext_tiny, efficientnet_b0) or timm:NAME")
    arg("--epochs", type=int, help="number of training epochs")
    arg("--batch-size", type=int, help="total batch size over all processes")
    arg("--lr", type=float, help="base learning rate (SGD)")
    arg("--image-size", type=int, help="side of the square training views, in pixels")
    arg("--queue-size", type=int, help="number of keys K in the queue of negatives")
    arg("--moco-momentum", type=float, help="momentum m of the key encoder")
    arg("--temperature", type=float, help="temperature T of the loss (v1 0.07, v2 0.2)")
    arg("--dim", type=int, help="output dimension of the head (the keys' dimension)")
    arg("--weight-decay", type=float, help="weight decay of SGD")
    arg("--schedule-milestones", help="v1: comma-separated epochs where lr is divided by 10")
    arg("--crop-min", type=float, help="smallest area fraction of the random resized crop")
    arg("--blur-p", type=float, help="v2: probability of the Gaussian blur per view")
    arg("--shuffle-splits", type=int, help="single process only: BatchNorm sub-batches of the "
        "key encoder (Shuffle-BN emulated with SplitBatchNorm); unused under torchrun")
    arg("--accumulate", type=int, help="split each process's batch into N micro-batches whose "
        "gradients add up to one optimiser step (exact without BatchNorm)")
    arg("--knn-bank", type=int, help="kNN monitor: training images in the bank (random, fixed)")
    arg("--knn-queries", type=int, help="kNN monitor: held-out images classified (random)")
    arg("--shapes-train", type=int, help="--data shapes: number of training images drawn")
    arg("--shapes-val", type=int, help="--data shapes: number of held-out images drawn")
    arg("--workers", type=int, default=min(8, os.cpu_count() or 1),
        help="data loader worker processes per process (0: load in the main process)")
    arg("--augment-on", choices=("gpu", "cpu"), default="gpu",
        help="'gpu': augment batched on --device; 'cpu': in the loader workers")
    arg("--max-steps", type=int, default=0, help="stop (and checkpoint) after N steps")
    arg("--log-every", type=int, default=20, help="read the losses back to the host every N "
        "steps (and at epoch ends) for the progress bar and metrics.csv; no read in between")
    arg("--output-dir", default="runs/example", help="checkpoints and metrics go here")
    arg("--resume", default="", help="checkpoint path, or 'auto' (newest in --output-dir)")
    arg("--seed", type=int, default=0, help="seed of every random choice of the run")
    arg("--device", default="cuda" if torch.cuda.is_available() else "cpu",
        help="'cpu' or 'cuda' (one GPU per process under torchrun)")
    arg("--compile", action="store_true", help="torch.compile the encoders")
    arg("--print-config", action="store_true", help="print the resolved settings and exit")
    return p


def parse_args(argv: list[str] | None = None, version: str = "v2") -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    paper = {**PAPER, "temperature": 0.2 if version == "v2" else 0.07}  # the papers' T
    for name, value in {**paper, **RECIPES.get(args.data, {})}.items():
        if getattr(args, name) is None:  # not given: the recipe's value
            setattr(args, name, value)
    if args.print_config:
        print(json.dumps({k: v for k, v in vars(args).items() if k != "print_config"}, indent=1))
        sys.exit(0)
    return args


def fail(message: str) -> NoReturn:
    sys.exit(f"error: {message}")  # on stderr, exit status 1


def flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"  # batch_size -> --batch-size


def check_batch_split(batch_size: int, world: int) -> None:
    if batch_size % world:
        fail(f"--batch-size {batch_size} does not split across {world} processes")


def check_steps(images: int, batch_size: int) -> int:
    """Full batches per epoch; an error naming --batch-size when there is none."""
    if images < batch_size:
        fail(f"--batch-size {batch_size} is larger than the {images} training images: no full "
             "batch to train on (lower --batch-size)")
    return images // batch_size


def validate(args: argparse.Namespace, *, blur: bool) -> None:
    """Every flag, checked before anything is built: a mistake costs seconds, not an epoch."""
    a, world = vars(args), int(os.environ.get("WORLD_SIZE", "1"))
    for name in ("batch_size", "epochs", "lr", "image_size", "queue_size", "dim", "knn_bank",
                 "knn_queries", "shapes_train", "shapes_val", "shuffle_splits", "temperature",
                 "log_every", "accumulate"):
        if a[name] is not None and not a[name] > 0:  # NaN too
            fail(f"{flag(name)} must be positive, got {a[name]}")
    for name in ("max_steps", "workers", "weight_decay"):
        if not a[name] >= 0:
            fail(f"{flag(name)} must be >= 0, got {a[name]}")
    for name in ("lr", "weight_decay", "temperature"):
        if not math.isfinite(a[name]):
            fail(f"{flag(name)} must be finite, got {a[name]}")
    for name in ("moco_momentum", "blur_p", "crop_min"):
        if not 0 <= a[name] <= 1 or (name == "crop_min" and a[name] == 0):
            low = "(0" if name == "crop_min" else "[0"
            fail(f"{flag(name)} must be in {low}, 1], got {a[name]}")
    if not all(m.strip().lstrip("-").isdigit() for m in args.schedule_milestones.split(",")):
        fail(f"--schedule-milestones must be integers, got {args.schedule_milestones!r}")
    check_arch(args.arch)
    check_batch_split(args.batch_size, world)
    b, n, splits, size = args.batch_size, args.accumulate, args.shuffle_splits, args.image_size
    local, patch, fits = b // world, 16 if size >= 128 else 8, f"does not fit --arch {args.arch}"
    for bad, message in [
        (world == 1 and b % splits,
         f"--batch-size {b} does not split into --shuffle-splits {splits} BatchNorm sub-batches"),
        (local < 2, f"--batch-size {b} gives fewer than 2 images per process: BatchNorm"),
        (local % n, f"--accumulate {n} does not split the {local} images per process "
                    f"(--batch-size {b} over {world}) into equal micro-batches"),
        (local // n < 2, f"--accumulate {n} gives micro-batches of fewer than 2 images: BatchNorm"),
        (world == 1 and local // n % splits, f"--accumulate {n} gives micro-batches of {local // n}"
         f" images, which do not split into --shuffle-splits {splits} BatchNorm sub-batches"),
        (args.arch == "small_cnn" and size < 8,
         f"--image-size {size} {fits}: it halves the image three times: it needs at least 8 px"),
        (args.arch in VITS and size % patch,
         f"--image-size {size} {fits}: {patch}-px patches at this size: use a multiple of {patch}"),
        (blur and size < 12, f"--image-size {size} {fits}: the 23-px blur kernel needs 12 px"),
        (size > 4096, f"--image-size {size}: the augmentation takes at most 4096 px"),
        (Path(args.output_dir).exists() and not Path(args.output_dir).is_dir(),
         f"--output-dir {args.output_dir} is a file, not a folder"),
        (args.resume not in ("", "auto") and not os.path.isfile(args.resume),
         f"--resume {args.resume}: no such file"),
    ]:
        if bad:
            fail(message)
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError):
        fail(f"--device {args.device!r} is not a device ('cpu', 'cuda')")
    if device.type not in ("cpu", "cuda"):
        fail(f"--device {args.device!r}: these scripts run on 'cpu' or 'cuda'")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {args.device}: CUDA is not available here (use --device cpu)")


def check_arch(arch: str) -> None:
    """A built-in name, a torchvision classification model or ``timm:NAME``."""
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
            fail(f"--arch {arch} is not one of {', '.join(ARCHS)}, a torchvision classification "
                 "model (e.g. mobilenet_v3_small, convnext_tiny, efficientnet_b0) or timm:NAME")
# fmt: on


# ---- Set-up: one process, or one per GPU under torchrun
def setup(args: argparse.Namespace) -> tuple[torch.device, int, int]:
    """Join torchrun's process group; seed every rank alike (identical models and queue)."""
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    return device, rank, world


def seed_for(*key: int) -> int:
    """A 63-bit seed hashed from ``key``, spread over the low 32 bits a CPU generator uses."""
    digest = hashlib.blake2b("/".join(map(str, key)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# ---- Data: uint8 images in memory or in files; an epoch's order fixed by (seed, epoch)
@functools.cache
def has_torchcodec() -> bool:
    return importlib.util.find_spec("torchcodec") is not None


def decode(path: str) -> torch.Tensor:
    """``(3, H, W)`` uint8 RGB; 16-bit PNGs rounded to 8 bits; a broken file is named. With
    TorchCodec (torchvision's decoders are deprecated for it since torchvision 0.29), else
    torchvision's, without the deprecation warning (it only says TorchCodec is missing)."""
    try:
        if has_torchcodec():
            from torchcodec.decoders import decode_image

            image = decode_image(path, mode="RGB", output_dtype="auto")
        else:
            import torchvision.io as io

            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", ".*superseded.*TorchCodec", DeprecationWarning)
                image = io.decode_image(path, mode=io.ImageReadMode.RGB)
    except (RuntimeError, ValueError, OSError) as e:
        raise RuntimeError(f"cannot decode image file {path}: {e}") from e
    if image.ndim == 4:  # an animated GIF (frames, C, H, W): its first frame
        image = image[0]
    if image.dtype == torch.uint16:  # 0 -> 0, 65535 -> 255, 257 * v -> v
        image = ((image.to(torch.int32) * 255 + 32767) // 65535).to(torch.uint8)
    return image


class Images(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Images as a uint8 tensor (N, C, H, W) or a list of files. With a ``transform`` (CPU
    augmentation), item ``(i, seed)`` is image i's two views, drawn from ``seed``."""

    def __init__(self, items: Any, labels: torch.Tensor, transform: Any = None) -> None:
        self.items, self.labels, self.transform = items, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: torch.Tensor) -> Images:
        items = self.items[idx] if isinstance(self.items, torch.Tensor) else [
            self.items[i] for i in idx.tolist()]  # fmt: skip
        return Images(items, self.labels[idx], self.transform)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Any, torch.Tensor]:
        i, seed = key if isinstance(key, tuple) else (key, None)
        item = decode(self.items[i]) if isinstance(self.items, list) else self.items[i]
        if self.transform is not None:  # the same views from any worker, and after a resume
            g = None if seed is None else torch.Generator().manual_seed(seed)
            item = tuple(v[0] for v in self.transform(item[None], generator=g))
        return item, self.labels[i]  # a 0-d tensor: no host read in the loop


def datasets(args: argparse.Namespace) -> tuple[Images, Images, int]:
    """(train, held-out, classes). Without a val/ folder the held-out split *is* the training
    set (the same object: the kNN monitor then keeps its bank and queries apart)."""
    if args.data == "shapes":
        x, y = make_shapes(args.shapes_train + args.shapes_val, args.image_size, seed=1234)
        n = args.shapes_train
        return Images(x[:n], y[:n]), Images(x[n:], y[n:]), 10
    import torchvision.datasets as tvd

    if args.data in RECIPES:  # CIFAR-10/100, STL-10: a copy under --data-root, else download

        def load(cls: Any, **split: Any) -> Any:
            for download in (False, True):
                try:
                    return cls(args.data_root, download=download, **split)
                except Exception as e:
                    if download:
                        fail(f"--data {args.data}: no copy under --data-root {args.data_root} "
                             f"and the download failed ({type(e).__name__}: {e})")  # fmt: skip

        if args.data == "stl10":  # pre-training on unlabeled (label -1) + train; kNN: test
            sets = [load(tvd.STL10, split="train+unlabeled"), load(tvd.STL10, split="test")]
            return *(Images(torch.from_numpy(d.data), torch.from_numpy(d.labels).long())
                     for d in sets), 10  # type: ignore[return-value]  # fmt: skip
        cls = tvd.CIFAR10 if args.data == "cifar10" else tvd.CIFAR100
        sets = [load(cls, train=True), load(cls, train=False)]  # (N, 32, 32, 3) uint8
        return *(Images(torch.from_numpy(d.data).permute(0, 3, 1, 2).contiguous(),
                        torch.tensor(d.targets)) for d in sets), len(sets[0].classes)  # type: ignore[return-value]  # fmt: skip
    root = Path(args.data)
    if not (root / "train").is_dir():
        fail(f"--data {root} has no train/ folder (ImageFolder layout expected)")
    try:
        folders = [tvd.ImageFolder(str(root / s)) for s in ("train", "val") if (root / s).is_dir()]
    except FileNotFoundError as e:  # no class folders, or no images in them
        fail(f"{root} is empty or not in ImageFolder layout: {e}")
    if len(folders) == 2 and folders[1].classes != folders[0].classes:
        fail(f"{root}/val has other classes than {root}/train")
    train, *val = (Images([s for s, _ in d.samples], torch.tensor(d.targets)) for d in folders)
    return train, (val[0] if val else train), len(folders[0].classes)


def collate(batch: list[tuple[Any, torch.Tensor]]) -> tuple[Any, torch.Tensor]:
    """Stack the images (a list when their sizes differ) or the CPU-augmented views."""
    items, labels = zip(*batch, strict=True)
    if isinstance(items[0], tuple):
        return tuple(torch.stack(v) for v in zip(*items, strict=True)), torch.stack(labels)
    same = all(i.shape == items[0].shape for i in items)
    return (torch.stack(items) if same else list(items)), torch.stack(labels)


def loader(data: Images, args: argparse.Namespace, batch: int, epoch: int | None = None,
           start: int = 0, rank: int = 0, world: int = 1) -> Any:  # fmt: skip
    """All images in order; or (``epoch`` given) this rank's training batches of a permutation
    fixed by (seed, epoch), from batch ``start`` on: a resume replays exactly the batches not
    trained yet, and a step covers the same images under any number of processes. A CPU
    augmentation draws each image's views from (seed, epoch, position in the epoch)."""
    order: Any = None
    if epoch is not None:
        steps = len(data) // (batch * world)
        g = torch.Generator().manual_seed(args.seed * 100_003 + epoch)
        perm = torch.randperm(len(data), generator=g)[: steps * world * batch]
        perm, place = perm.view(steps, world, batch), torch.arange(len(perm)).view(steps, world, -1)
        order = [[(i, seed_for(args.seed, epoch, p)) if data.transform else i for i, p in
                  zip(perm[s, rank].tolist(), place[s, rank].tolist(), strict=True)]
                 for s in range(start, steps)]  # fmt: skip
    return torch.utils.data.DataLoader(
        data, **({"batch_size": batch} if order is None else {"batch_sampler": order}),
        num_workers=args.workers if isinstance(data.items, list) or data.transform else 0,
        collate_fn=collate, pin_memory=args.device.startswith("cuda"),
        generator=torch.Generator().manual_seed(args.seed),  # leaves the global stream alone
    )  # fmt: skip


def to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, (list, tuple)):
        return type(x)(to_device(v, device) for v in x)
    return x.to(device, non_blocking=True)


# ---- MoCo v1/v2: a backbone, the paper's head, the key encoder, the queue and the step
VITS = {"vit_tiny": (4, 3, 192), "vit_small": (12, 12, 384), "vit_base": (12, 12, 768)}
# (layers, heads, width); vit_small is the v3 paper's ViT-S: 12 heads (DeiT's has 6).


def backbone(arch: str, image_size: int, num_heads: int | None = None) -> tuple[nn.Module, int]:
    """A randomly initialised feature extractor and its output size."""
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
        depth, heads, width = VITS[arch]
        patch = 16 if image_size >= 128 else 8
        vit = torchvision.models.VisionTransformer(
            image_size, patch, depth, num_heads or heads, width, 4 * width)  # fmt: skip
        return strip_classifier(vit)
    size: dict[str, Any] = {"image_size": image_size} if arch.startswith("vit_") else {}
    if arch in ("googlenet", "inception_v3"):  # features only: no auxiliary classifiers
        size |= {"aux_logits": False, "init_weights": True}  # (their default, unwarned)
    net = torchvision.models.get_model(arch, weights=None, **size)
    if arch.startswith("resnet") and image_size <= 32:  # the CIFAR stem (the authors' demo):
        net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)  # 3x3, stride 1, no max-pool
        net.maxpool = nn.Identity()
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


def attention_heads(arch: str, features: nn.Module) -> int | None:
    """A ViT's number of attention heads, which checkpoints record (no weight holds it)."""
    if arch in VITS or not arch.removeprefix("timm:").startswith(("vit", "deit")):
        return VITS[arch][1] if arch in VITS else None
    heads = (getattr(m, "num_heads", None) for m in features.modules())
    return next((h for h in heads if isinstance(h, int)), None)


def build(args: argparse.Namespace, version: str, env: tuple[torch.device, int, int]) -> Any:
    """(stateful, train_step, augment, features) of MoCo ``version`` ('v1' or 'v2')."""
    device, _, world = env
    features, feature_dim = checked_backbone(args.arch, args.image_size)
    head = (moco_v2_head if version == "v2" else moco_v1_head)(feature_dim, out_dim=args.dim)
    model = nn.Sequential(features, head).to(device)
    if world > 1:  # the query encoder trains under DDP; the key encoder uses Shuffle-BN
        ids = [device] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    key_encoder = MomentumEncoder(model, momentum=args.moco_momentum)
    if world == 1 and args.shuffle_splits > 1:  # one process: emulate per-GPU BatchNorm
        convert_split_batchnorm(key_encoder.key_encoder, args.shuffle_splits)
    queue = KeyQueue(args.queue_size, args.dim).to(device)
    sgd = {"lr": args.lr, "momentum": 0.9, "weight_decay": args.weight_decay}
    optimizer = torch.optim.SGD(model.parameters(), **sgd)
    if version == "v2":  # v2: blur, cosine schedule, T 0.2; v1: step schedule, T 0.07
        augment = MoCoV2Augment(args.image_size, scale=(args.crop_min, 1), blur_p=args.blur_p)
    else:
        augment = MoCoV1Augment(args.image_size, scale=(args.crop_min, 1))
    milestones = [int(m) for m in args.schedule_milestones.split(",")]
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
        key_encoder.to(memory_format=torch.channels_last)
    encode_q = torch.compile(model) if args.compile else model
    encode_k = torch.compile(key_encoder) if args.compile else key_encoder
    ddp, n = isinstance(model, nn.parallel.DistributedDataParallel), args.accumulate
    # Shuffle-BN's permutations: a generator of their own, seeded each step from Python's
    # `random` (no tensor read; saved in checkpoints), so torch's stream, which draws the
    # augmentations, is the same for any --accumulate N.
    shuffle_rng = torch.Generator(device=device)

    def train_step(x_q: torch.Tensor, x_k: torch.Tensor, epoch: float) -> dict[str, Any]:
        if version == "v2":
            lr = args.lr * 0.5 * (1 + math.cos(math.pi * epoch / args.epochs))
        else:
            lr = args.lr * 0.1 ** sum(epoch >= m for m in milestones)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if device.type == "cuda":
            x_q, x_k = (x.contiguous(memory_format=torch.channels_last) for x in (x_q, x_k))
        key_encoder.update()  # m * key + (1 - m) * query, once, before computing the keys
        negatives = queue.negatives()  # one snapshot for every micro-batch of the step
        optimizer.zero_grad(set_to_none=True)
        total, keys, size = torch.zeros((), device=device), [], len(x_q) // n
        shuffle_rng.manual_seed(random.getrandbits(62))
        for i in range(n):  # micro-batches; DDP all-reduces the gradients after the last
            rows = slice(i * size, (i + 1) * size)
            with (
                model.no_sync() if ddp and i < n - 1 else contextlib.nullcontext(),
                torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"),
            ):
                q = encode_q(x_q[rows])  # (N / n, dim) queries
                shuffled, idx = batch_shuffle(x_k[rows], shuffle_rng)  # Shuffle-BN
                k = batch_unshuffle(encode_k(shuffled), idx)  # (N / n, dim) keys, no grad
                loss = info_nce(q, k, negatives, temperature=args.temperature) / n
            loss.backward()  # the gradients add up to the mean over the whole batch
            total += loss.detach()
            keys.append(k)
        optimizer.step()
        # every rank's keys, in order (the unshuffle's own tensor: its gather is reused)
        queue.push(keys[0] if n == 1 else torch.cat(keys))
        return {"loss": total, "lr": lr, "momentum": args.moco_momentum}

    stateful = {"model": model, "key_encoder": key_encoder, "queue": queue, "optimizer": optimizer}
    return stateful, train_step, augment.to(device), features


# ---- The loop's helpers: the step log, the kNN monitor, checkpoints
class StepLog:
    """Collects (step, epoch, loss, lr, momentum) with the loss left on the device; ``flush``
    reads the pending losses in one transfer and ``write``s one metrics.csv row per step."""

    def __init__(self, every: int, batch_size: int, write: Any) -> None:
        self.every, self.batch_size, self.write = every, batch_size, write
        self.pending: list[tuple[int, int, torch.Tensor, float, float]] = []
        self.tick, self.last = time.perf_counter(), {}  # last: for the progress bar

    def add(self, step: int, epoch: int, loss: torch.Tensor, lr: float, momentum: float) -> None:
        self.pending.append((step, epoch, loss.detach(), lr, momentum))  # no host read

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def flush(self) -> None:
        if not self.pending:
            return
        losses = torch.stack([p[2] for p in self.pending]).float().tolist()  # the one read
        now = time.perf_counter()
        rate, self.tick = self.batch_size * len(self.pending) / (now - self.tick), now
        for (step, epoch, _, lr, m), loss in zip(self.pending, losses, strict=True):
            self.write({"step": step, "epoch": epoch, "loss": repr(loss), "lr": lr,
                        "momentum": m, "images_per_s": round(rate, 1)})  # fmt: skip
        _, _, _, lr, m = self.pending.pop()
        self.last = {"loss": sum(losses) / len(losses), "lr": lr, "momentum": m, "img_s": rate}
        self.pending.clear()


def plot(out: Path) -> None:
    """metrics.png: the loss per step and the kNN accuracy per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    loss, knn = [r for r in rows if r["loss"]], [r for r in rows if r["knn_top1"]]
    a.plot([int(r["step"]) for r in loss], [float(r["loss"]) for r in loss], lw=0.8)
    a.set(xlabel="step", ylabel="loss", title="pre-training loss")
    b.plot([int(r["step"]) for r in knn], [float(r["knn_top1"]) for r in knn], marker="o")
    b.set(xlabel="step", ylabel="kNN top-1 (%)", title="held-out kNN accuracy")
    fig.tight_layout()
    fig.savefig(out / "metrics.png", dpi=100)
    plt.close(fig)


def evaluation_batches(data: Images, args: argparse.Namespace, device: torch.device) -> Any:
    """Every image resized to the training size and normalised (ImageNet's statistics)."""
    mean = torch.tensor((0.485, 0.456, 0.406), device=device).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225), device=device).view(1, 3, 1, 1)
    resize = {"size": (args.image_size, args.image_size), "mode": "bilinear", "antialias": True}
    for x, y in loader(Images(data.items, data.labels), args, 256):
        x = torch.cat([nn.functional.interpolate(i[None].to(device).float(), **resize) for i in x])
        yield (x / 255 - mean) / std, y.to(device)


def knn_split(train: Images, val: Images, bank: int, queries: int, seed: int) -> Any:
    """(bank into train, queries into val), uniform from ``seed`` (ImageFolder lists files
    class by class). If ``val is train``, the queries are at most half, the bank the rest."""
    g = torch.Generator().manual_seed(seed)
    if val is train:
        perm = torch.randperm(len(train), generator=g)
        n = min(queries, len(train) // 2)
        chosen_bank, chosen_queries = perm[n : n + bank], perm[:n]
    else:  # the bank from labelled images only (STL-10's unlabeled split has label -1)
        labelled = (train.labels >= 0).nonzero().flatten()
        chosen_bank = labelled[torch.randperm(len(labelled), generator=g)[:bank]]
        chosen_queries = torch.randperm(len(val), generator=g)[:queries]
    return chosen_bank.sort().values, chosen_queries.sort().values  # files in folder order


@torch.no_grad()
def knn_accuracy(features: nn.Module, train: Images, val: Images, classes: int,
                 args: argparse.Namespace, device: torch.device) -> float:  # fmt: skip
    """Weighted kNN top-1 (%) of the frozen features (k 200, as the authors' monitor)."""
    was_training = features.training
    features.eval()
    bank_idx, query_idx = knn_split(train, val, args.knn_bank, args.knn_queries, args.seed)
    embedded = []
    for data in (train.subset(bank_idx), val.subset(query_idx)):
        pairs = []
        for x, y in evaluation_batches(data, args, device):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                pairs.append((features(x).float(), y))
        embedded.append([torch.cat(b) for b in zip(*pairs, strict=True)])
    (bank, bank_labels), (feats, labels) = embedded
    pred = knn_predict(feats, bank, bank_labels, classes, k=min(200, len(bank))).argmax(1)
    features.train(was_training)
    return 100.0 * (pred == labels).float().mean().item()


# A checkpoint holds the unwrapped modules' states (no DDP "module." prefix: it resumes under
# any number of processes), every rank's generator states ("rng", by rank), the step, the
# flags, the kNN baseline and a ViT's head count (the layout of docs/guides/checkpointing.md).
def unwrap(obj: Any) -> Any:
    return obj.module if isinstance(obj, nn.parallel.DistributedDataParallel) else obj


def state_of(stateful: dict[str, Any]) -> dict[str, Any]:
    return {name: unwrap(obj).state_dict() for name, obj in stateful.items()}


def load_states(stateful: dict[str, Any], ckpt: dict[str, Any]) -> None:
    """Also a checkpoint saved with DDP's ``module.`` prefix (older scripts)."""
    for name, obj in stateful.items():
        state = ckpt[name]
        if isinstance(unwrap(obj), nn.Module):
            state = {re.sub(r"^(key_encoder\.)?module\.", r"\1", k): v for k, v in state.items()}
        unwrap(obj).load_state_dict(state)


def rng_states(device: torch.device) -> list[dict[str, Any]]:
    """Every rank's generator states, in rank order (a collective)."""
    mine = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(device)
    every: list[Any] = [mine] * (dist.get_world_size() if dist.is_initialized() else 1)
    if dist.is_initialized():
        dist.all_gather_object(every, mine)
    return every


def reseed(seed: int, rank: int, step: int) -> None:
    torch.manual_seed(seed_for(seed, rank, step))
    random.seed(seed_for(seed, rank, step))


def restore_rng(states: Any, args: argparse.Namespace, rank: int, world: int, step: int) -> None:
    """Rank r takes the states rank r saved: the same number of processes continues exactly;
    a new rank is reseeded from (seed, rank, step): deterministic, but another run."""
    states = states if isinstance(states, list) else [states]  # one dict: older checkpoints
    if rank < len(states):
        torch.set_rng_state(states[rank]["torch"].cpu())
        random.setstate(states[rank]["python"])
        if "cuda" in states[rank] and args.device.startswith("cuda"):
            torch.cuda.set_rng_state(states[rank]["cuda"].cpu(), torch.cuda.current_device())
    else:
        reseed(args.seed, rank, step)
        print(f"warning: rank {rank} has no saved random state: reseeded from (seed, rank, "
              "step)", file=sys.stderr)  # fmt: skip
    if rank == 0 and len(states) != world:
        print(f"warning: the checkpoint holds the random states of {len(states)} processes, "
              f"this run has {world}: the augmentations will differ from the original run's",
              file=sys.stderr)  # fmt: skip


WARN_IF_CHANGED = ("batch_size", "epochs", "seed", "lr", "image_size", "data", "augment_on",
                   "moco_momentum", "temperature", "weight_decay", "schedule_milestones",
                   "crop_min", "blur_p", "shapes_train", "accumulate")  # fmt: skip


def load_resume(args: argparse.Namespace, recipe: str) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint to resume, read and checked against the flags before anything is built."""
    if not args.resume:
        return None
    found = sorted(Path(args.output_dir).glob("checkpoint_*.pt"))  # checkpoint_<step>.pt
    path = (found[-1] if found else None) if args.resume == "auto" else Path(args.resume)
    if path is None:
        print(f"no checkpoint in {args.output_dir}: starting from scratch")
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"--resume {path} is not a checkpoint ({type(e).__name__}: {e})")
    if not isinstance(ckpt, dict) or not {"recipe", "step", "args", "model", "rng"} <= ckpt.keys():
        fail(f"--resume {path} is not a checkpoint of these scripts (keys recipe, step, args, "
             "model, rng)")  # fmt: skip
    if ckpt["recipe"] != recipe:
        fail(f"{path} is a {ckpt['recipe']} checkpoint, not {recipe}")
    saved, ours = ckpt["args"], vars(args)

    def changed(*names: str) -> str:
        names = tuple(
            n
            for n in names  # None: not recorded (--temperature up to 0.3.0)
            if saved.get(n) is not None and n in ours and saved[n] != ours[n]
        )
        return ", ".join(f"{flag(n)} {ours[n]} (checkpoint: {saved[n]})" for n in names)

    vit = args.arch.startswith("vit")  # a torchvision ViT's weights depend on the image size
    if differ := changed("arch", "dim", "queue_size", *["image_size"] * vit):
        fail(f"--resume {path} was trained with other settings: {differ}")  # tensors' shapes
    if (heads := VITS.get(args.arch, (0, None))[1]) and ckpt.get("num_heads") != heads:
        has = f"has {ckpt['num_heads']}" if ckpt.get("num_heads") else \
            "does not record its (up to 0.2.0, vit_small: 6)"  # fmt: skip
        fail(f"--resume {path} {has} attention heads, --arch {args.arch} has {heads}")
    if (differ := changed(*WARN_IF_CHANGED)) and int(os.environ.get("RANK", "0")) == 0:
        print(f"warning: resuming with changed {differ}", file=sys.stderr)
    return path, ckpt


def debug_dump(stateful: dict[str, Any], rank: int, tag: str) -> None:
    """For the tests: every rank's own states, in $MOCO_EXAMPLES_DUMP_DIR/rank<r>_<tag>.pt."""
    if folder := os.environ.get("MOCO_EXAMPLES_DUMP_DIR"):
        Path(folder).mkdir(parents=True, exist_ok=True)
        torch.save(state_of(stateful), Path(folder) / f"rank{rank}_{tag}.pt")


# ---- The loop: epochs of steps; at each epoch's end the kNN monitor and a checkpoint
def main(version: str = "v2") -> None:
    from tqdm import tqdm

    args = parse_args(version=version)
    validate(args, blur=version == "v2" and args.blur_p > 0)
    recipe = f"moco_{version}"
    resume = load_resume(args, recipe)  # checked before anything is built
    device, rank, world = setup(args)
    stateful, train_step, augment, features = build(args, version, (device, rank, world))
    train, val, classes = datasets(args)
    if args.augment_on == "cpu":  # two views made per image in the loader workers
        train = Images(train.items, train.labels, transform=copy.deepcopy(augment).cpu())
    steps_per_epoch = check_steps(len(train), args.batch_size)
    out, fields = Path(args.output_dir), ["step", "epoch", "loss", "lr", "momentum"]
    fields += ["images_per_s", "knn_top1"]
    metrics, step, baseline = out / "metrics.csv", 0, None
    out.mkdir(parents=True, exist_ok=True)
    if resume is not None:
        path, ckpt = resume
        load_states(stateful, ckpt)
        step, baseline = ckpt["step"], ckpt["knn_baseline"]
        if rank == 0 and metrics.exists():  # drop the rows a crash wrote after the checkpoint
            with open(metrics, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
            with open(metrics.with_suffix(".tmp"), "w", newline="") as f:
                csv.DictWriter(f, fields).writeheader()
                csv.DictWriter(f, fields).writerows(rows)
            os.replace(metrics.with_suffix(".tmp"), metrics)
        print(f"resumed from {path} at step {step}")
        debug_dump(stateful, rank, "loaded")

    def knn_now() -> float:  # measured on rank 0; the other ranks hold 0.0
        return knn_accuracy(features, train, val, classes, args, device) if rank == 0 else 0.0

    if baseline is None:
        baseline = knn_now()
        if rank == 0:
            print(f"kNN top-1 at random initialisation: {baseline:.1f}%")
    if rank == 0 and (resume is None or not metrics.exists()):
        with open(metrics, "w", newline="") as f:
            csv.DictWriter(f, fields).writeheader()
    if resume is not None:  # every rank its own generators, as saved
        restore_rng(resume[1]["rng"], args, rank, world, step)
    else:  # the models were built alike on every rank; now each rank its own stream
        reseed(args.seed, rank, 0)

    def log(row: dict[str, Any]) -> None:
        if rank == 0:
            with open(metrics, "a", newline="") as f:
                csv.DictWriter(f, fields).writerow(row)

    steps, knn = StepLog(args.log_every, args.batch_size, log), baseline
    last = args.epochs * steps_per_epoch
    last = min(args.max_steps, last) if args.max_steps else last
    while step < last:
        epoch, start = divmod(step, steps_per_epoch)
        batches = loader(train, args, args.batch_size // world, epoch, start, rank, world)
        desc = f"epoch {epoch + 1}/{args.epochs}"
        bar = tqdm(batches, total=steps_per_epoch, initial=start, disable=rank != 0,
                   mininterval=2, desc=desc, file=sys.stdout)  # fmt: skip
        for images, _ in bar:
            images = to_device(images, device)
            views = images if isinstance(images, tuple) else augment(images)
            stats = train_step(*views, epoch + (step % steps_per_epoch) / steps_per_epoch)
            step += 1
            steps.add(step, epoch, stats["loss"], stats["lr"], stats["momentum"])  # no host read
            if steps.due(step):
                steps.flush()  # one read of the last --log-every losses
                s = steps.last
                bar.set_postfix(loss=f"{s['loss']:.3f}", lr=f"{s['lr']:.3g}",
                                m=f"{s['momentum']:.4f}", img_s=f"{s['img_s']:.0f}")  # fmt: skip
            if step == last or step % steps_per_epoch == 0:
                break
        bar.close()
        steps.flush()  # the epoch's (or run's) last steps, before the kNN and the checkpoint
        if step % steps_per_epoch == 0:
            knn = knn_now()
            log({"step": step, "epoch": epoch, "knn_top1": round(knn, 2)})
            if rank == 0:
                print(f"epoch {epoch + 1}: kNN top-1 {knn:.1f}%")
        rng, tag = rng_states(device), f"{step:07d}"  # every rank's (a collective)
        debug_dump(stateful, rank, tag)
        if rank == 0:  # written, then renamed: a killed run leaves the previous checkpoint
            plot(out)
            heads = attention_heads(args.arch, features)
            torch.save({**state_of(stateful), "recipe": recipe, "step": step, "rng": rng,
                        "args": vars(args), "knn_baseline": baseline, "num_heads": heads},
                       out / "checkpoint.tmp")  # fmt: skip
            os.replace(out / "checkpoint.tmp", out / f"checkpoint_{tag}.pt")
            for old in out.glob("checkpoint_*.pt"):  # keep only the newest
                if old.name != f"checkpoint_{tag}.pt":
                    old.unlink()
    if rank == 0:
        print(f"done: {step} steps; kNN top-1 {knn:.1f}% (random initialisation {baseline:.1f}%)"
              f"; checkpoints and metrics in {out}")  # fmt: skip
        if device.type == "cuda":
            print(f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")


if __name__ == "__main__":
    main("v2")
