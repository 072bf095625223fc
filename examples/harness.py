"""What a training run needs besides MoCo: the machinery moco_v2.py and moco_v3.py share
(linear_eval.py too, in part). Nothing of a MoCo recipe is here, and no data (data.py).

* Flags: ``fail`` (a one-line error), ``OneLineParser``, the argparse ``type=`` checks
  (``positive_int``, ``fraction``, ...), ``run_flags`` (the flags of a run that are not its
  method's: data, backbone, kNN monitor, output, resume, device), ``parse_flags``
  (``--print-config``) and ``check_flags`` (the flags that must fit together).
* Processes: ``setup`` (torchrun's process group, the device, the seed), every rank's
  random states (``rng_states``) and their restore (``restore_rng``).
* Backbones: ``backbone``, ``checked_backbone`` (a bad ``--arch`` stops in one line) and
  ``attention_heads`` (a ViT's, which checkpoints record).
* The loop's helpers: ``load_data``, ``training_views`` (each step's two views, epoch after
  epoch), ``StepLog`` (metrics.csv), ``plot`` (metrics.png), the kNN monitor
  (``knn_accuracy``, ``KnnMonitor``) and the last line (``report``).
* Checkpoints: ``state_of``, ``load_states``, ``save_checkpoint``, ``load_resume``,
  ``resume_states``, and ``debug_dump`` for the tests.

The scripts import it as ``from harness import ...``; it imports no script.
"""

from __future__ import annotations

import argparse
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
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from data import Images, datasets, epoch_batches, evaluation_batches, knn_split, loader, to_device
from torch import nn

from momentum_contrast.heads import strip_classifier
from momentum_contrast.knn import knn_predict

Env = tuple[torch.device, int, int]  # (device, rank, world): what ``setup`` returns
# ViTs: (layers, heads, width). vit_small is the MoCo v3 paper's ViT-S, 12 heads (DeiT's and
# timm's have 6, as these scripts up to 0.2.0); checkpoints record the count (``num_heads``).
VITS = {"vit_tiny": (4, 3, 192), "vit_small": (12, 12, 384), "vit_base": (12, 12, 768)}
ARCHS = ("small_cnn", "resnet18", "resnet50", *VITS)


# ---- Flags: argparse checks each flag as it reads it; ``check_flags`` those that must fit
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


def run_flags(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds to a pre-training script's parser the flags of the run: the data, the backbone,
    the kNN monitor, the loaders, the output, resuming, the seed and the device."""
    arg, cpus = p.add_argument, min(8, os.cpu_count() or 1)
    arg("--data", default="shapes", help="shapes (built in), cifar10, cifar100, stl10 or a folder")
    arg("--data-root", default="data", help="where cifar10, cifar100, stl10 are (or go)")
    arg("--arch", default="resnet50", help=f"{', '.join(ARCHS)}, torchvision's or timm:NAME")
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


def parse_flags(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """The flags (``argv``, else the command line); ``--print-config`` prints them and exits."""
    args = parser.parse_args(argv)
    if args.print_config:
        print(json.dumps({k: v for k, v in vars(args).items() if k != "print_config"}, indent=1))
        sys.exit(0)
    return args


def check_flags(args: argparse.Namespace, *own: tuple[Any, str], blur: bool = False) -> None:
    """Stops at the first pair ``(bad, message)`` that is bad: the batch's split across the
    processes (and into ``--accumulate`` micro-batches, for a script that has the flag), a
    script's ``own`` checks, the backbone's fit to the image size, the 23-px blur's if
    ``blur``, the device, the output folder."""
    b, size, arch, world = args.batch_size, args.image_size, args.arch, world_size()
    n, patch = vars(args).get("accumulate"), 16 if size >= 128 else 8  # n: None in linear_eval
    local, fits = b // world, f"--image-size {size} does not fit --arch {arch}"
    for bad, message in [
        (b % world, f"--batch-size {b} does not split across {world} processes"),
        (n and local % n, f"--accumulate {n} does not split the {local} images per process "
                          f"(--batch-size {b} over {world}) into equal micro-batches"),
        (n and local // n < 2, f"--accumulate {n} gives micro-batches of fewer than 2 "
                               "images: BatchNorm"),
        *own,
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


def run_steps(args: argparse.Namespace, images: int) -> tuple[int, int]:
    """(steps per epoch, the step the run stops after: --max-steps, else the last epoch's)."""
    steps_per_epoch = check_steps(images, args.batch_size)
    last = args.epochs * steps_per_epoch
    return steps_per_epoch, min(args.max_steps, last) if args.max_steps else last


# ---- Set-up: one process, or one per GPU under torchrun; every rank's random stream
def world_size() -> int:
    """The number of processes torchrun starts (1 without it), known before any is joined."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(args: argparse.Namespace, *, alone: bool = False) -> Env:
    """Join torchrun's process group (``alone``, without torchrun: a group of one); seed
    every rank alike (identical models, and queue)."""
    backend = "nccl" if args.device == "cuda" else "gloo"
    if "RANK" in os.environ:
        dist.init_process_group(backend)
    elif alone:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
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


# ---- Backbones: --arch, built with random weights, its classifier taken off
def is_vit(arch: str) -> bool:  # torchvision's vit_* and timm's ViTs
    return arch.removeprefix("timm:").startswith(("vit", "deit"))


def backbone(
    arch: str, image_size: int, num_heads: int | None = None, keep_classifier: bool = False
) -> tuple[nn.Module, int]:
    """A randomly initialised feature extractor and its output size (or the whole model, 0)."""
    finish = (lambda net: (net, 0)) if keep_classifier else strip_classifier
    if arch == "small_cnn":  # four conv-BN-ReLU stages: quick on a CPU
        layers: list[nn.Module] = []
        for c_in, c_out in ((3, 32), (32, 64), (64, 128), (128, 256)):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out)]
            layers += [nn.ReLU(), nn.MaxPool2d(2) if c_out < 256 else nn.AdaptiveAvgPool2d(1)]
        return nn.Sequential(*layers, nn.Flatten()), 256
    if arch.startswith("timm:"):
        import timm

        return finish(timm.create_model(arch[5:], pretrained=False))
    import torchvision

    if arch in VITS:  # a checkpoint's record of the heads overrides the table's
        (depth, heads, width), patch = VITS[arch], 16 if image_size >= 128 else 8
        layout = (image_size, patch, depth, num_heads or heads, width, 4 * width)
        return finish(torchvision.models.VisionTransformer(*layout))
    size: dict[str, Any] = {"image_size": image_size} if arch.startswith("vit_") else {}
    if arch in ("googlenet", "inception_v3"):  # features only: no auxiliary classifiers
        size |= {"aux_logits": False, "init_weights": True}  # (their default, unwarned)
    net = torchvision.models.get_model(arch, weights=None, **size)
    if arch.startswith("resnet") and image_size <= 32:  # the CIFAR stem, as the authors' demo
        net.conv1, net.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    return finish(net)


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


# ---- The loop's helpers: the data, each step's views, the step log, the kNN monitor
def load_data(args: argparse.Namespace, **kwargs: Any) -> tuple[Images, Images, int]:
    """(train, held-out, classes) of --data (without a val/ folder held-out *is* train), or
    an error naming --data; ``kwargs`` go to ``data.datasets``."""
    try:
        return datasets(args.data, args.data_root, args.image_size, args.shapes_train,
                        args.shapes_val, **kwargs)  # fmt: skip
    except (OSError, RuntimeError) as e:
        fail(f"--data {args.data}: {e}")


def training_views(
    args: argparse.Namespace, train: Images, augment: nn.Module, log: StepLog, env: Env, *,
    step: int, last: int,
) -> Iterator[Any]:  # fmt: skip
    """The two views of each step after ``step`` (a resumed run's), up to step ``last``:
    each epoch's batches (data.epoch_batches: this rank's share, from where the run is),
    augmented on the device or in the loaders (--augment-on cpu), under rank 0's progress
    bar, which shows the latest of ``log``'s losses."""
    from tqdm import tqdm

    device, rank, world = env
    steps_per_epoch, cpu_views = len(train) // args.batch_size, args.augment_on == "cpu"
    views = Images(train.items, train.labels, copy.deepcopy(augment).cpu()) if cpu_views else train
    while step < last:
        epoch, start = divmod(step, steps_per_epoch)
        batches = epoch_batches(len(train), args.batch_size // world, seed=args.seed,
                                epoch=epoch, start=start, rank=rank, world=world,
                                view_seeds=cpu_views)  # fmt: skip
        bar = tqdm(total=steps_per_epoch, initial=start, disable=rank != 0, mininterval=2,
                   desc=f"epoch {epoch + 1}/{args.epochs}", file=sys.stdout)  # fmt: skip
        pin = device.type == "cuda"
        for images, _ in loader(views, batches, workers=args.workers, seed=args.seed, pin=pin):
            step += 1
            bar.update()  # the step about to run
            if end := step == last or step % steps_per_epoch == 0:
                bar.close()  # the epoch's end: what the loop prints then goes below the bar
            images = to_device(images, device)
            yield images if cpu_views else augment(images)  # two (N, 3, H, W) views
            if end:
                break
            bar.set_postfix({k: f"{v:.4g}" for k, v in log.last.items()}, refresh=False)


class StepLog:
    """metrics.csv, written on rank 0 (``path`` None elsewhere): a row per step, its loss read
    with the pending ones in one transfer by ``flush``, and a row per kNN measurement. ``keep``:
    a resumed checkpoint's step (a crash's later rows are dropped). ``last``: for the bar."""

    FIELDS = ("step", "epoch", "loss", "lr", "momentum", "images_per_s", "knn_top1")

    def __init__(self, path: Path | None, every: int, batch_size: int, *, keep: int = 0) -> None:
        self.path, self.every, self.batch_size = path, every, batch_size
        self.pending: list[tuple[int, int, torch.Tensor, float, float]] = []
        self.last: dict[str, float] = {}  # the latest flush's, for the progress bar
        self.tick, kept = time.perf_counter(), []
        if path is not None and keep and path.exists():
            with open(path, newline="") as f:
                kept = [row for row in csv.DictReader(f) if int(row["step"]) <= keep]
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
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


class KnnMonitor:
    """The kNN monitor: [`knn_accuracy`][] of ``features``, measured on rank 0 and printed
    there (the other ranks hold 0.0). ``gather``, if given, runs first on every rank (v3's
    --fsdp: the sharded backbone into rank 0's copy, a collective)."""

    def __init__(self, features: nn.Module, data: tuple[Images, Images, int], args: Any,
                 env: Env, *, gather: Any = None) -> None:  # fmt: skip
        self.features, self.data, self.args, self.env = features, data, args, env
        self.gather, self.at, self.value = gather, -1, 0.0  # the latest: its step, its value

    def __call__(self, step: int, line: str, **fields: Any) -> float:
        """The kNN top-1 (%) at ``step``; rank 0 prints ``line`` formatted with ``fields``,
        ``step`` and ``value``."""
        (device, rank, _), (train, val, classes) = self.env, self.data
        if self.gather is not None:
            self.gather()
        value = 0.0
        if rank == 0:
            value = knn_accuracy(self.features, train, val, classes, self.args, device)
            print(line.format(step=step, value=value, **fields))
        self.at, self.value = step, value
        return value

    def final(self, step: int) -> float:
        """The kNN top-1 (%) of the weights at ``step``, where the run stops: the one measured
        at that epoch's end, else (a stop inside an epoch, or no step run) measured now."""
        if self.at == step:
            return self.value
        return self(step, "kNN top-1 at step {step}: {value:.1f}%")


def report(step: int, knn: float, baseline: float, out: Path, env: Env) -> None:
    """Rank 0's last line: the steps, the kNN at the stop and at random initialisation."""
    device, rank, _ = env
    if rank == 0:
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0
        print(f"done: {step} steps; kNN top-1 {knn:.1f}% (random initialisation {baseline:.1f}%)"
              f"{f'; peak GPU memory {peak:.1f} GiB' if peak else ''}; checkpoints and metrics "
              f"in {out}")  # fmt: skip


# ---- Checkpoints. One holds the unwrapped modules' states (no DDP "module." prefix: it
# resumes under any number of processes), every rank's generator states ("rng", by rank), the
# step, the flags, the kNN baseline and a ViT's head count (docs/guides/checkpointing.md).
def state_of(pieces: dict[str, Any]) -> dict[str, Any]:
    return {name: getattr(obj, "module", obj).state_dict() for name, obj in pieces.items()}


def load_states(pieces: dict[str, Any], ckpt: dict[str, Any]) -> None:
    """Also a checkpoint of older scripts, with DDP's "module." prefix."""
    for name, obj in pieces.items():
        state, obj = ckpt[name], getattr(obj, "module", obj)
        if isinstance(obj, nn.Module):
            state = {re.sub(r"^(key_encoder\.)?module\.", r"\1", k): v for k, v in state.items()}
        obj.load_state_dict(state)


def save_checkpoint(out: Path, state: dict[str, Any], meta: dict[str, Any], step: int,
                    env: Env) -> None:  # fmt: skip
    """The pieces' ``state`` and the run's ``meta`` at ``step``, with every rank's random
    states (a collective: every rank calls it). Rank 0 writes checkpoint_<step>.pt, then
    renames it (a killed run leaves the previous one whole): only the newest stays. It
    redraws metrics.png."""
    device, rank, world = env
    rng = rng_states(device, world)
    debug_dump(state, rank, f"{step:07d}")
    if rank == 0:
        plot(out)
        torch.save({**state, **meta, "step": step, "rng": rng}, out / "checkpoint.tmp")
        os.replace(out / "checkpoint.tmp", out / f"checkpoint_{step:07d}.pt")
        for old in sorted(out.glob("checkpoint_*.pt"))[:-1]:
            old.unlink()


def resume_states(
    resume: tuple[Path, dict[str, Any]] | None, pieces: dict[str, Any], env: Env, *,
    load: Any = load_states, states: Any = state_of,
) -> tuple[int, Any, Any]:  # fmt: skip
    """The step, kNN baseline and every rank's random states of ``resume`` (load_resume's),
    its states loaded into ``pieces`` (``load``; ``states`` reads them back for the tests'
    dump); a new run's: (0, None, [])."""
    if resume is None:
        return 0, None, []
    path, ckpt = resume
    load(pieces, ckpt)
    print(f"resumed from {path} at step {ckpt['step']}")
    debug_dump(states(pieces), env[1], "loaded")
    return ckpt["step"], ckpt["knn_baseline"], ckpt["rng"]


def debug_dump(state: dict[str, Any], rank: int, tag: str) -> None:
    """For the tests: every rank's own states, in $MOCO_EXAMPLES_DUMP_DIR/rank<r>_<tag>.pt."""
    if folder := os.environ.get("MOCO_EXAMPLES_DUMP_DIR"):
        Path(folder).mkdir(parents=True, exist_ok=True)
        torch.save(state, Path(folder) / f"rank{rank}_{tag}.pt")


def load_resume(
    args: argparse.Namespace, recipe: str, must_match: tuple[str, ...], warn: tuple[str, ...]
) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint to resume, read and checked against the flags before anything is built:
    a ``recipe`` checkpoint whose flags ``must_match`` (the tensors' shapes) the command
    line's; a changed flag of ``warn`` is a warning."""
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
    if differ := changed(*must_match, *["image_size"] * vit):
        fail(f"--resume {path} was trained with other settings: {differ}")
    if (heads := VITS.get(args.arch, (0, None))[1]) and ckpt.get("num_heads") != heads:
        has = f"has {ckpt['num_heads']}" if ckpt.get("num_heads") else "does not record its"
        fail(f"--resume {path} {has} attention heads, --arch {args.arch} has {heads}")
    if (differ := changed(*warn)) and int(os.environ.get("RANK", "0")) == 0:
        print(f"warning: resuming with changed {differ}", file=sys.stderr)
    return path, ckpt
