"""What a training run needs besides MoCo: the machinery moco_v2.py and moco_v3.py share
(linear_eval.py too, in part). Nothing of a MoCo recipe is here, and no data (data.py).

* Flags: ``fail`` (a one-line error), ``OneLineParser``, the argparse ``type=`` checks
  (``positive_int``, ``fraction``, ...), ``run_flags`` (the flags of a run that are not its
  method's: data, backbone, kNN monitor, output, resume, device), ``parse_flags``
  (``--print-config``) and ``check_flags`` (the flags that must fit together).
* Processes: ``setup`` (torchrun's process group, the device, the seed) and ``leave``.
* Backbones: ``backbone``, ``checked_backbone`` (a bad ``--arch`` stops in one line) and
  ``attention_heads`` (a ViT's, which checkpoints record).
* The loop's helpers: ``load_data`` and ``training_views`` (each step's two views, epoch
  after epoch).

What a run reports (metrics.csv, metrics.png, the kNN monitor) is in monitoring.py;
checkpoints and resuming are in checkpoints.py.

The scripts import it as ``from harness import ...``; it imports no script.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from data import Images, datasets, epoch_batches, loader, to_device
from monitoring import Env, StepLog
from torch import nn

from momentum_contrast.heads import strip_classifier

# ViTs: (layers, heads, width). vit_small is the MoCo v3 paper's ViT-S, 12 heads (DeiT's and
# timm's have 6, as these scripts up to 0.2.0); checkpoints record the count (``num_heads``).
VITS = {"vit_tiny": (4, 3, 192), "vit_small": (12, 12, 384), "vit_base": (12, 12, 768)}
ARCHS = ("small_cnn", "resnet18", "resnet50", *VITS)
BUILT_IN = ("shapes", "cifar10", "cifar100", "stl10")  # --data: these, else an ImageFolder root


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
seed = number(int, "in 0..2**32 - 1", lambda v: 0 <= v < 2**32)  # data.py multiplies it


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
    arg("--save-every", type=non_negative_int, default=0,
        help="a checkpoint every N steps too (0: at each epoch's end only)")  # fmt: skip
    arg("--keep", type=positive_int, default=2, help="the newest N checkpoints stay")
    arg("--seed", type=seed, default=0, help="seed of every random choice of the run")
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
    split = f"--accumulate {n}" if n != 1 else f"--batch-size {b} over {world} processes"
    for bad, message in [
        (b % world, f"--batch-size {b} does not split across {world} processes"),
        (n and local % n, f"--accumulate {n} does not split the {local} images per process "
                          f"(--batch-size {b} over {world}) into equal micro-batches"),
        (n and local // n < 2, f"{split} gives micro-batches of fewer than 2 images: "
                               "BatchNorm"),
        *own,
        (arch == "small_cnn" and size < 8, f"{fits}: it halves the image three times: 8 px"),
        (arch in VITS and size % patch, f"{fits}: {patch}-px patches: use a multiple of {patch}"),
        (blur and size < 12, f"{fits}: the 23-px blur kernel needs 12 px at least"),
        (args.data not in BUILT_IN and not Path(args.data, "train").is_dir(),
         f"--data {args.data} has no train/ folder (an ImageFolder root), nor is it one of "
         f"{', '.join(BUILT_IN)}"),
        (args.data == "shapes" and args.shapes_train < b,
         f"--batch-size {b} is larger than the {args.shapes_train} training images "
         "(--shapes-train)"),
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


# ---- Set-up: one process, or one per GPU under torchrun
def world_size() -> int:
    """The number of processes torchrun starts (1 without it), known before any is joined."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(args: argparse.Namespace, *, alone: bool = False) -> Env:
    """Join torchrun's process group (``alone``, without torchrun: a group of one); seed
    every rank alike (identical models, and queue)."""
    backend = "nccl" if args.device == "cuda" else "gloo"
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    shared = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    if restarts and shared and os.environ.get("RANK") == "0":
        print("warning: torchrun shares its rendezvous store with these processes: under "
              "the c10d rendezvous (--rdzv-backend c10d, --standalone), restarted ones would "
              "read the failed attempt's addresses and never connect (pytorch issue 135712); "
              "launch with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1. The static rendezvous "
              "(torchrun's default) restarts without it (docs/guides/multi-node.md)",
              file=sys.stderr)  # fmt: skip
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


def leave() -> None:
    """Leave the process group after ``main`` has returned. The group must die here, not in
    the interpreter's shutdown, where its threads freeing the last collectives' tensors can
    no longer take the GIL and the process aborts ("terminate called without an active
    exception"): the models that still hold it (DDP's reducer, in reference cycles) go
    first, then the group."""
    gc.collect()
    if dist.is_initialized():
        dist.barrier()  # no rank tears down while another still talks to it
        if tuple(map(int, torch.__version__.split(".")[:2])) < (2, 8):
            # gloo's destructor held the GIL that its threads, freeing the last collectives'
            # tensors, may wait for: a hang (pytorch PR 154976). Let them finish first.
            time.sleep(0.2)
        dist.destroy_process_group()


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


# ---- The loop's helpers: the data, each step's views
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
