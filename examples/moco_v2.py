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
bottom: flags, set-up, the MoCo pieces and their step (``build``), the loop's helpers, the
loop; the data comes from data.py. A checkpoint resumes exactly, in any number of processes.
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
import re
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from data import Images, datasets, epoch_batches, evaluation_batches, knn_split, loader, to_device
from torch import nn

from momentum_contrast import KeyQueue, MomentumEncoder, info_nce
from momentum_contrast.augment import MoCoV1Augment, MoCoV2Augment
from momentum_contrast.distributed import batch_shuffle, batch_unshuffle
from momentum_contrast.heads import moco_v1_head, moco_v2_head, strip_classifier
from momentum_contrast.knn import knn_predict
from momentum_contrast.norm import convert_split_batchnorm

# ---- Flags: the paper's defaults (in the parser), replaced by a data set's recipe (RECIPES),
# replaced by the command line. argparse checks each flag; ``validate`` those that must fit.
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
RECIPES = {"shapes": SHAPES, "cifar10": CIFAR, "cifar100": CIFAR,  # any other --data: the paper's
           "stl10": {**CIFAR, "image_size": 96, "knn_bank": 5000, "knn_queries": 8000}}  # fmt: skip
# ViTs: (layers, heads, width). vit_small is the MoCo v3 paper's ViT-S, 12 heads (DeiT's and
# timm's have 6, as these scripts up to 0.2.0); checkpoints record the count (``num_heads``).
VITS = {"vit_tiny": (4, 3, 192), "vit_small": (12, 12, 384), "vit_base": (12, 12, 768)}
ARCHS = ("small_cnn", "resnet18", "resnet50", *VITS)


def fail(message: str) -> NoReturn:
    sys.exit(f"error: {message}")  # on stderr, exit status 1


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # "error: argument --flag: what is wrong"
        fail(message)


def number(kind: type, rule: str, ok: Any) -> Any:
    """An argparse ``type=``: a finite ``kind`` for which ``ok(value)`` holds."""

    def convert(text: str) -> Any:
        if not (math.isfinite(value := kind(text)) and ok(value)):  # kind(): a ValueError
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value

    convert.__name__ = kind.__name__  # argparse's "invalid int value: 'x'"
    return convert


positive_int = number(int, "positive", lambda v: v > 0)
non_negative_int = number(int, ">= 0", lambda v: v >= 0)
positive_float = number(float, "positive and finite", lambda v: v > 0)
non_negative_float = number(float, "finite and >= 0", lambda v: v >= 0)
fraction = number(float, "in [0, 1]", lambda v: 0 <= v <= 1)
pixels = number(int, "in 1..4096 (the augmentation's largest)", lambda v: 0 < v <= 4096)


def milestones(text: str) -> str:  # "120,160": epochs
    return ",".join(str(int(epoch)) for epoch in text.split(","))


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description="MoCo v1/v2 pre-training")
    arg, cpus = p.add_argument, min(8, os.cpu_count() or 1)
    arg("--data", default="shapes", help="shapes (built in), cifar10, cifar100, stl10 or a folder")
    arg("--data-root", default="data", help="where cifar10, cifar100, stl10 are (or go)")
    arg("--arch", default="resnet50", help=f"{', '.join(ARCHS)}, torchvision's or timm:NAME")
    arg("--epochs", type=positive_int, default=200, help="number of training epochs")
    arg("--batch-size", type=positive_int, default=256, help="total over all processes")
    arg("--lr", type=positive_float, default=0.03, help="base learning rate (SGD)")
    arg("--image-size", type=pixels, default=224, help="side of the square views, in pixels")
    arg("--queue-size", type=positive_int, default=65536, help="keys K in the queue")
    arg("--moco-momentum", type=fraction, default=0.999, help="momentum m of the key encoder")
    arg("--temperature", type=positive_float, help="T of the loss (the paper's: v1 0.07, v2 0.2)")
    arg("--dim", type=positive_int, default=128, help="output size of the head (the keys')")
    arg("--weight-decay", type=non_negative_float, default=1e-4, help="weight decay of SGD")
    arg("--schedule-milestones", type=milestones, default="120,160", help="v1: lr / 10 at epochs")
    arg("--crop-min", type=number(float, "in (0, 1]", lambda v: 0 < v <= 1), default=0.2,
        help="smallest area fraction of the random resized crops")  # fmt: skip
    arg("--blur-p", type=fraction, default=0.5, help="v2: probability of the blur per view")
    arg("--shuffle-splits", type=positive_int, default=8, help="one process: Shuffle-BN's splits")
    arg("--accumulate", type=positive_int, default=1, help="micro-batches per process and step")
    arg("--knn-bank", type=positive_int, default=50000, help="kNN monitor: training images")
    arg("--knn-queries", type=positive_int, default=10000, help="kNN monitor: held-out images")
    arg("--shapes-train", type=positive_int, default=4000, help="--data shapes: training images")
    arg("--shapes-val", type=positive_int, default=1000, help="--data shapes: held-out images")
    arg("--workers", type=non_negative_int, default=cpus, help="loader processes per process")
    arg("--augment-on", choices=("gpu", "cpu"), default="gpu", help="on --device, or in loaders")
    arg("--max-steps", type=non_negative_int, default=0, help="stop (and save) after N steps")
    arg("--log-every", type=positive_int, default=20, help="read the losses every N steps")
    arg("--output-dir", default="runs/example", help="checkpoints and metrics go here")
    arg("--resume", default="", help="checkpoint path, or 'auto' (the newest in --output-dir)")
    arg("--seed", type=int, default=0, help="seed of every random choice of the run")
    arg("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
        help="one GPU per process under torchrun")  # fmt: skip
    arg("--compile", action="store_true", help="torch.compile the encoders")
    arg("--print-config", action="store_true", help="print the resolved settings and exit")
    return p


def parse_args(argv: list[str] | None = None, version: str = "v2") -> argparse.Namespace:
    parser = build_parser()
    data = parser.parse_known_args(argv)[0].data
    parser.set_defaults(temperature=0.2 if version == "v2" else 0.07)  # the papers' T
    parser.set_defaults(**RECIPES.get(data, {}))  # the data set's recipe, over the paper's
    args = parser.parse_args(argv)
    if args.print_config:
        print(json.dumps({k: v for k, v in vars(args).items() if k != "print_config"}, indent=1))
        sys.exit(0)
    return args


def validate(args: argparse.Namespace, *, blur: bool) -> None:
    """The flags that must fit together (argparse checked each alone), and the processes."""
    b, n, splits = args.batch_size, args.accumulate, args.shuffle_splits
    size, arch, world = args.image_size, args.arch, int(os.environ.get("WORLD_SIZE", "1"))
    local, patch = b // world, 16 if size >= 128 else 8
    micro, fits = local // n, f"--image-size {size} does not fit --arch {arch}"
    for bad, message in [
        (b % world, f"--batch-size {b} does not split across {world} processes"),
        (local % n, f"--accumulate {n} does not split the {local} images per process "
                    f"(--batch-size {b} over {world}) into equal micro-batches"),
        (micro < 2, f"--accumulate {n} gives micro-batches of fewer than 2 images: BatchNorm"),
        (world == 1 and micro % splits, f"--shuffle-splits {splits} does not split the "
                                        f"{micro} images of a (micro-)batch"),
        (arch == "small_cnn" and size < 8, f"{fits}: it halves the image three times: 8 px"),
        (arch in VITS and size % patch, f"{fits}: {patch}-px patches: use a multiple of {patch}"),
        (blur and size < 12, f"{fits}: the 23-px blur kernel needs 12 px at least"),
        (args.device == "cuda" and not torch.cuda.is_available(), "--device cuda: no CUDA here"),
        (Path(args.output_dir).is_file(), f"--output-dir {args.output_dir} is a file"),
    ]:  # fmt: skip
        if bad:
            fail(message)


def check_steps(images: int, batch_size: int) -> int:
    """Full batches per epoch; an error naming --batch-size when there is none."""
    if images < batch_size:
        fail(f"--batch-size {batch_size} is larger than the {images} training images")
    return images // batch_size


# ---- Set-up: one process, or one per GPU under torchrun; every rank's random stream
def setup(args: argparse.Namespace) -> tuple[torch.device, int, int]:
    """Join torchrun's process group; seed every rank alike (identical models and queue)."""
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    return device, rank, world


def rng_states(device: torch.device, world: int) -> list[dict[str, Any]]:
    """Every rank's generator states, in rank order (a collective)."""
    mine = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(device)
    every: list[Any] = [mine] * world
    if world > 1:
        dist.all_gather_object(every, mine)
    return every


def restore_rng(saved: list[dict[str, Any]], seed: int, rank: int, world: int, step: int) -> None:
    """Rank r takes the states rank r saved: the same number of processes continues exactly.
    A rank without (all of them in a new run) is seeded from (seed, rank, step)."""
    saved = saved if isinstance(saved, list) else [saved]  # one dict: older checkpoints
    if rank < len(saved):
        torch.set_rng_state(saved[rank]["torch"])
        random.setstate(saved[rank]["python"])
        if "cuda" in saved[rank] and torch.cuda.is_initialized():
            torch.cuda.set_rng_state(saved[rank]["cuda"], torch.cuda.current_device())
    else:  # a 63-bit hash of (seed, rank, step): the same stream in any process
        digest = hashlib.blake2b(f"{seed}/{rank}/{step}".encode(), digest_size=8).digest()
        torch.manual_seed(int.from_bytes(digest, "little") >> 1)
        random.seed(int.from_bytes(digest, "little") >> 1)
    if saved and rank >= len(saved):
        print(f"warning: rank {rank} has no saved random state: reseeded", file=sys.stderr)
    if saved and rank == 0 and len(saved) != world:
        print(f"warning: the checkpoint holds the random states of {len(saved)} processes, "
              f"this run has {world}: the augmentations will differ", file=sys.stderr)  # fmt: skip


# ---- MoCo v1/v2: a backbone, the paper's head, the key encoder, the queue and the step
def is_vit(arch: str) -> bool:  # torchvision's vit_* and timm's ViTs
    return arch.removeprefix("timm:").startswith(("vit", "deit"))


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

    if arch in VITS:  # a checkpoint's record of the heads overrides the table's
        (depth, heads, width), patch = VITS[arch], 16 if image_size >= 128 else 8
        layout = (image_size, patch, depth, num_heads or heads, width, 4 * width)
        return strip_classifier(torchvision.models.VisionTransformer(*layout))
    size: dict[str, Any] = {"image_size": image_size} if arch.startswith("vit_") else {}
    if arch in ("googlenet", "inception_v3"):  # features only: no auxiliary classifiers
        size |= {"aux_logits": False, "init_weights": True}  # (their default, unwarned)
    net = torchvision.models.get_model(arch, weights=None, **size)
    if arch.startswith("resnet") and image_size <= 32:  # the CIFAR stem, as the authors' demo
        net.conv1, net.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    return strip_classifier(net)


def checked_backbone(arch: str, image_size: int) -> tuple[nn.Module, int]:
    """[`backbone`][]; a name that is no model, or a model that cannot be used at this size,
    stops here, naming --arch, not with a traceback in the first step: a copy takes one
    training forward of 2 images (the random state kept), which must give (2, dim) features."""
    if arch in ARCHS:
        return backbone(arch, image_size)
    try:
        features, dim = backbone(arch, image_size)
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            out = copy.deepcopy(features).train()(torch.zeros(2, 3, image_size, image_size))
    except (ImportError, TypeError) as e:  # timm is missing; strip_classifier's refusal
        fail(f"--arch {arch}: {e}")
    except Exception as e:  # no such model; e.g. a ViT's patch size, timm's fixed input size
        fail(f"--arch {arch} does not work at --image-size {image_size}: {e}")
    if not isinstance(out, torch.Tensor) or out.shape != (2, dim):
        fail(f"--arch {arch} gives {getattr(out, 'shape', out)}, not (N, {dim}) features")
    return features, dim


def attention_heads(arch: str, features: nn.Module) -> int | None:
    """A ViT's number of attention heads, which checkpoints record (no weight holds it)."""
    heads = (getattr(m, "num_heads", None) for m in features.modules()) if is_vit(arch) else ()
    return next((h for h in heads if isinstance(h, int)), None)


def build(args: argparse.Namespace, version: str, env: tuple[torch.device, int, int]) -> Any:
    """(pieces, train_step, augment, features) of MoCo ``version`` ('v1' or 'v2')."""
    device, _, world = env
    features, feature_dim = checked_backbone(args.arch, args.image_size)
    head = (moco_v2_head if version == "v2" else moco_v1_head)(feature_dim, out_dim=args.dim)
    model = nn.Sequential(features, head).to(device)  # the query encoder
    if world > 1:  # the query encoder trains under DDP; the key encoder uses Shuffle-BN
        ids = [device] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    key_encoder = MomentumEncoder(model, momentum=args.moco_momentum)
    if world == 1 and args.shuffle_splits > 1:  # one process: emulate per-GPU BatchNorm
        convert_split_batchnorm(key_encoder.key_encoder, args.shuffle_splits)
    queue = KeyQueue(args.queue_size, args.dim).to(device)  # (K, dim) unit-norm keys
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
    # Shuffle-BN's permutations: their own generator, seeded each step from Python's `random`
    # (no tensor read), so torch's stream (the augmentations) is the same for any --accumulate
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
        negatives = queue.negatives()  # (K, dim): one snapshot for every micro-batch
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

    pieces = {"model": model, "key_encoder": key_encoder, "queue": queue, "optimizer": optimizer}
    return pieces, train_step, augment.to(device), features


# ---- The loop's helpers: the step log, the kNN monitor, checkpoints
class StepLog:
    """metrics.csv, written on rank 0 (``path`` None elsewhere): a row per step, its loss read
    with the pending ones in one transfer by ``flush``, and a row per kNN measurement. ``keep``:
    a resumed checkpoint's step (a crash's later rows are dropped). ``last``: for the bar."""

    FIELDS = ("step", "epoch", "loss", "lr", "momentum", "images_per_s", "knn_top1")

    def __init__(self, path: Path | None, every: int, batch_size: int, *, keep: int = 0) -> None:
        self.path, self.every, self.batch_size = path, every, batch_size
        self.pending: list[tuple[int, int, torch.Tensor, float, float]] = []
        self.tick, self.last, kept = time.perf_counter(), {}, []
        if path is not None and keep and path.exists():
            with open(path, newline="") as f:
                kept = [row for row in csv.DictReader(f) if int(row["step"]) <= keep]
        self.write(*kept, mode="w")

    def write(self, *rows: dict[str, Any], mode: str = "a") -> None:
        if self.path is not None:
            with open(self.path, mode, newline="") as f:
                writer = csv.DictWriter(f, self.FIELDS)
                if mode == "w":
                    writer.writeheader()
                writer.writerows(rows)

    def add(self, step: int, epoch: int, loss: torch.Tensor, lr: float, momentum: float) -> bool:
        """Keeps a step (its loss on the device: no host read); True: time to ``flush``."""
        self.pending.append((step, epoch, loss.detach(), lr, momentum))
        return step % self.every == 0

    def flush(self) -> None:
        if not self.pending:
            return
        losses = torch.stack([p[2] for p in self.pending]).float().tolist()  # the one read
        now, (*_, lr, momentum) = time.perf_counter(), self.pending[-1]
        rate, self.tick = self.batch_size * len(losses) / (now - self.tick), now
        self.write(*({"step": s, "epoch": e, "loss": repr(v), "lr": r, "momentum": m,
                      "images_per_s": round(rate, 1)}
                     for (s, e, _, r, m), v in zip(self.pending, losses, strict=True)))  # fmt: skip
        self.last = {"loss": sum(losses) / len(losses), "lr": lr, "m": momentum, "img_s": rate}
        self.pending.clear()


def plot(out: Path) -> None:
    """metrics.png: the loss per step and the kNN accuracy per epoch."""
    from matplotlib.figure import Figure

    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    fig = Figure(figsize=(10, 3.5), layout="tight")
    for ax, key in zip(fig.subplots(1, 2), ("loss", "knn_top1"), strict=True):
        points = [(int(row["step"]), float(row[key])) for row in rows if row[key]]
        ax.plot(*zip(*points, strict=True), marker="o" if key == "knn_top1" else None)
        ax.set(xlabel="step", title="held-out kNN top-1 (%)" if key == "knn_top1" else key)
    fig.savefig(out / "metrics.png", dpi=100)


@torch.no_grad()
def knn_accuracy(features: nn.Module, train: Images, val: Images, classes: int, args: Any,
                 device: torch.device) -> float:  # fmt: skip
    """Weighted kNN top-1 (%) of the frozen features (k 200, as the authors' monitor) of
    --knn-queries held-out images against a bank of --knn-bank training images."""
    features.eval()
    embedded = []  # [(N, features) features, (N,) labels] of the bank, then of the queries
    chosen = knn_split(train, val, bank=args.knn_bank, queries=args.knn_queries, seed=args.seed)
    for data, idx in zip((train, val), chosen, strict=True):
        pairs = []
        for x, y in evaluation_batches(data.subset(idx), args.image_size, device):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                pairs.append((features(x).float(), y))
        embedded.append([torch.cat(part) for part in zip(*pairs, strict=True)])
    (bank, bank_labels), (queries, labels) = embedded
    features.train()
    pred = knn_predict(queries, bank, bank_labels, classes, k=min(200, len(bank))).argmax(1)
    return 100.0 * (pred == labels).float().mean().item()


# A checkpoint holds the unwrapped modules' states (no DDP "module." prefix: it resumes under
# any number of processes), every rank's generator states ("rng", by rank), the step, the
# flags, the kNN baseline and a ViT's head count (the layout of docs/guides/checkpointing.md).
def state_of(pieces: dict[str, Any]) -> dict[str, Any]:
    return {name: getattr(obj, "module", obj).state_dict() for name, obj in pieces.items()}


def load_states(pieces: dict[str, Any], ckpt: dict[str, Any]) -> None:
    """Also a checkpoint of older scripts, with DDP's "module." prefix."""
    for name, obj in pieces.items():
        state, obj = ckpt[name], getattr(obj, "module", obj)
        if isinstance(obj, nn.Module):
            state = {re.sub(r"^(key_encoder\.)?module\.", r"\1", k): v for k, v in state.items()}
        obj.load_state_dict(state)


def debug_dump(state: dict[str, Any], rank: int, tag: str) -> None:
    """For the tests: every rank's own states, in $MOCO_EXAMPLES_DUMP_DIR/rank<r>_<tag>.pt."""
    if folder := os.environ.get("MOCO_EXAMPLES_DUMP_DIR"):
        Path(folder).mkdir(parents=True, exist_ok=True)
        torch.save(state, Path(folder) / f"rank{rank}_{tag}.pt")


MUST_MATCH = ("arch", "dim", "queue_size")  # the tensors' shapes
WARN_IF_CHANGED = ("batch_size", "epochs", "seed", "lr", "image_size", "data", "augment_on",
                   "moco_momentum", "temperature", "weight_decay", "schedule_milestones",
                   "crop_min", "blur_p", "shapes_train", "accumulate")  # fmt: skip


def load_resume(args: argparse.Namespace, recipe: str) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint to resume, read and checked against the flags before anything is built."""
    if not args.resume:
        return None
    found = sorted(Path(args.output_dir).glob("checkpoint_*.pt"))  # checkpoint_<step>.pt
    path = Path(args.resume) if args.resume != "auto" else found[-1] if found else None
    if path is None:
        print(f"no checkpoint in {args.output_dir}: starting from scratch")
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # no such file, not a PyTorch file
        fail(f"--resume {path} is not a checkpoint ({type(e).__name__}: {e})")
    keys = ("recipe", "step", "args", "model", "rng")
    if not isinstance(ckpt, dict) or not all(k in ckpt for k in keys):
        fail(f"--resume {path} is not a checkpoint of these scripts (keys {', '.join(keys)})")
    if ckpt["recipe"] != recipe:
        fail(f"{path} is a {ckpt['recipe']} checkpoint, not {recipe}")
    saved, ours = ckpt["args"], vars(args)

    def changed(*names: str) -> str:  # None: not recorded (--temperature up to 0.3.0)
        differ = [n for n in names if saved.get(n) is not None and saved[n] != ours[n]]
        flags = (f"--{n.replace('_', '-')} {ours[n]} (checkpoint: {saved[n]})" for n in differ)
        return ", ".join(flags)

    vit = args.arch.startswith("vit")  # a torchvision ViT's weights depend on the image size
    if differ := changed(*MUST_MATCH, *["image_size"] * vit):
        fail(f"--resume {path} was trained with other settings: {differ}")
    if (heads := VITS.get(args.arch, (0, None))[1]) and ckpt.get("num_heads") != heads:
        has = f"has {ckpt['num_heads']}" if ckpt.get("num_heads") else "does not record its"
        fail(f"--resume {path} {has} attention heads, --arch {args.arch} has {heads}")
    if (differ := changed(*WARN_IF_CHANGED)) and int(os.environ.get("RANK", "0")) == 0:
        print(f"warning: resuming with changed {differ}", file=sys.stderr)
    return path, ckpt


# ---- The loop: epochs of steps; at each epoch's end the kNN monitor and a checkpoint
def main(version: str = "v2") -> None:
    from tqdm import tqdm

    args = parse_args(version=version)
    validate(args, blur=version == "v2" and args.blur_p > 0)
    recipe = f"moco_{version}"
    resume = load_resume(args, recipe)  # read and checked before anything is built
    device, rank, world = setup(args)
    pieces, train_step, augment, features = build(args, version, (device, rank, world))
    try:  # (train, held-out, classes); without a val/ folder held-out *is* train
        train, val, classes = datasets(args.data, args.data_root, args.image_size,
                                       args.shapes_train, args.shapes_val)  # fmt: skip
    except (OSError, RuntimeError) as e:
        fail(f"--data {args.data}: {e}")
    steps_per_epoch, cpu_views = check_steps(len(train), args.batch_size), args.augment_on == "cpu"
    views = Images(train.items, train.labels, copy.deepcopy(augment).cpu()) if cpu_views else train
    out, step, baseline, saved_rng = Path(args.output_dir), 0, None, []
    if resume is not None:
        path, ckpt = resume
        load_states(pieces, ckpt)
        step, baseline, saved_rng = ckpt["step"], ckpt["knn_baseline"], ckpt["rng"]
        print(f"resumed from {path} at step {step}")
        debug_dump(state_of(pieces), rank, "loaded")

    def knn_now() -> float:  # measured on rank 0; the other ranks hold 0.0
        return knn_accuracy(features, train, val, classes, args, device) if rank == 0 else 0.0

    if baseline is None:
        baseline = knn_now()
        if rank == 0:
            print(f"kNN top-1 at random initialisation: {baseline:.1f}%")
    out.mkdir(parents=True, exist_ok=True)
    log = StepLog(out / "metrics.csv" if rank == 0 else None, args.log_every, args.batch_size,
                  keep=step)  # fmt: skip
    restore_rng(saved_rng, args.seed, rank, world, step)  # from here each rank its own stream
    last = args.epochs * steps_per_epoch
    last, knn = min(args.max_steps, last) if args.max_steps else last, baseline
    meta = {"recipe": recipe, "args": vars(args), "knn_baseline": baseline,
            "num_heads": attention_heads(args.arch, features)}  # fmt: skip
    while step < last:
        epoch, start = divmod(step, steps_per_epoch)
        batches = epoch_batches(len(train), args.batch_size // world, seed=args.seed,
                                epoch=epoch, start=start, rank=rank, world=world,
                                view_seeds=cpu_views)  # fmt: skip
        bar = tqdm(loader(views, batches, workers=args.workers, seed=args.seed,
                          pin=device.type == "cuda"), total=steps_per_epoch, initial=start,
                   disable=rank != 0, mininterval=2, desc=f"epoch {epoch + 1}/{args.epochs}",
                   file=sys.stdout)  # fmt: skip
        for images, _ in bar:
            images = to_device(images, device)
            x = images if cpu_views else augment(images)  # two (N, 3, H, W) views
            stats = train_step(*x, step / steps_per_epoch)  # the epoch, a float
            step += 1
            if log.add(step, epoch, stats["loss"], stats["lr"], stats["momentum"]):
                log.flush()  # one read of the last --log-every losses
                bar.set_postfix({k: f"{v:.4g}" for k, v in log.last.items()})
            if step == last or step % steps_per_epoch == 0:
                break
        bar.close()
        log.flush()  # the epoch's (or run's) last steps, before the kNN and the checkpoint
        if step % steps_per_epoch == 0:
            knn = knn_now()
            log.write({"step": step, "epoch": epoch, "knn_top1": round(knn, 2)})
            if rank == 0:
                print(f"epoch {epoch + 1}: kNN top-1 {knn:.1f}%")
        rng, state = rng_states(device, world), state_of(pieces)  # every rank's (collectives)
        debug_dump(state, rank, f"{step:07d}")
        if rank == 0:  # written, then renamed: a killed run leaves the previous one whole
            plot(out)
            torch.save({**state, **meta, "step": step, "rng": rng}, out / "checkpoint.tmp")
            os.replace(out / "checkpoint.tmp", out / f"checkpoint_{step:07d}.pt")
            for old in sorted(out.glob("checkpoint_*.pt"))[:-1]:  # only the newest stays
                old.unlink()
    if rank == 0:
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0
        print(f"done: {step} steps; kNN top-1 {knn:.1f}% (random initialisation {baseline:.1f}%)"
              f"{f'; peak GPU memory {peak:.1f} GiB' if peak else ''}; checkpoints and metrics "
              f"in {out}")  # fmt: skip


if __name__ == "__main__":
    main("v2")
