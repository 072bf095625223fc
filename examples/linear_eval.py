"""Linear evaluation of a pre-trained backbone, in one file: frozen features, a linear classifier.

    python examples/linear_eval.py --pretrained runs/example/checkpoint_0001860.pt
    torchrun --nproc-per-node 8 examples/linear_eval.py --data /data/imagenet \\
        --pretrained runs/moco_v2/checkpoint_1000800.pt
    torchrun --nproc-per-node 8 examples/linear_eval.py --data /data/imagenet \\
        --pretrained moco_v2_800ep_pretrain.pth.tar          # the MoCo authors' checkpoint

``--pretrained`` takes a checkpoint of the example scripts, a MoCo v1/v2/v3 checkpoint
released by the authors (ResNet, or ViT with ``--arch vit_small``/``vit_base`` at 224 px), or
a plain state dict of a backbone (then ``--arch`` is required); ``momentum_contrast.convert``
reads each by its content. A ViT gets the number of attention heads its checkpoint records.

The protocol follows the reference code: the backbone is frozen with its BatchNorm in eval
mode; a linear layer (weights ~ N(0, 0.01), zero bias) is trained with SGD, momentum 0.9, no
weight decay, on random-resized crops and flips: MoCo v1/v2 lr 30 for 100 epochs, divided by
10 at 60 and 80; MoCo v3 lr 0.1 x batch/256 for 90 epochs, cosine. Reports top-1 and top-5 on
the held-out split (also in --output-dir/linear_eval.json) and checks the backbone is unchanged.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from shapes import make_shapes
from torch import nn
from tqdm import tqdm

from momentum_contrast import strip_classifier
from momentum_contrast.augment import TwoViewAugment, ViewRecipe
from momentum_contrast.convert import (
    LayoutError,
    backbone_spec,
    backbone_state_dict,
    checkpoint_kind,
)

# ---- Flags: the protocol's defaults (v1/v2, or v3), the shapes ones, then the command line
PAPER = {"epochs": 100, "batch_size": 256, "lr": 30.0, "schedule_milestones": "60,80",
         "shapes_train": 4000, "shapes_val": 1000}  # fmt: skip
V3 = {"epochs": 90, "batch_size": 1024, "lr": 0.1}
SHAPES = {"epochs": 5, "batch_size": 64, "schedule_milestones": "3,4"}
VITS = {"vit_tiny": (4, 3, 192), "vit_small": (12, 12, 384), "vit_base": (12, 12, 768)}
ARCHS = ("small_cnn", "resnet18", "resnet50", *VITS)


def fail(message: str) -> NoReturn:
    sys.exit(f"error: {message}")  # on stderr, exit status 1


# fmt: off
def build_parser(v3: bool, trained: dict[str, Any]) -> argparse.ArgumentParser:
    """The flags; ``trained``: the architecture and image size the checkpoint names."""
    p = argparse.ArgumentParser(description="Linear evaluation")
    arg = p.add_argument
    arg("--pretrained", help="checkpoint to evaluate (required): one of the example scripts', "
        "the MoCo authors' v1/v2/v3, or a backbone state dict (then give --arch)")
    arg("--arch", default=trained["arch"], help=f"backbone: {', '.join(ARCHS)}, a torchvision "
        "classification model or timm:NAME (default: the checkpoint's)")
    arg("--image-size", type=int, default=trained["image_size"], help="side of the crops (px)")
    arg("--data", default=trained.get("data", "shapes"), help="'shapes' (built in), 'cifar10', "
        "'cifar100', 'stl10' (under --data-root) or a folder with train/ [and val/] "
        "(ImageFolder); default: the checkpoint's pre-training data, else shapes")
    arg("--data-root", default=trained.get("data_root", "data"),
        help="cifar10|cifar100|stl10: where it is (or goes); default: the checkpoint's")
    arg("--epochs", type=int, help=f"epochs (v1/v2 {PAPER['epochs']}, v3 {V3['epochs']})")
    arg("--batch-size", type=int, help="total batch size over all processes")
    arg("--lr", type=float, help="learning rate (v3: for a batch of 256, scaled linearly)")
    arg("--schedule-milestones", help="v1/v2: comma-separated epochs where lr is divided by 10")
    arg("--shapes-train", type=int, help="--data shapes: number of training images drawn")
    arg("--shapes-val", type=int, help="--data shapes: number of held-out images drawn")
    arg("--workers", type=int, default=min(8, os.cpu_count() or 1), help="loader processes")
    arg("--seed", type=int, default=0, help="seed of the classifier and the training order")
    arg("--device", default="cuda" if torch.cuda.is_available() else "cpu",
        help="'cpu' or 'cuda' (one GPU per process under torchrun)")
    arg("--output-dir", default="runs/linear_eval", help="linear_eval.json (the result) goes here")
    arg("--print-config", action="store_true", help="print the resolved settings and exit")
    return p
# fmt: on


def parse_args(argv: list[str], v3: bool, trained: dict[str, Any]) -> argparse.Namespace:
    args = build_parser(v3, trained).parse_args(argv)
    defaults = {**PAPER, **(V3 if v3 else {}), **(SHAPES if args.data == "shapes" else {})}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.print_config:
        print(json.dumps({k: v for k, v in vars(args).items() if k != "print_config"}, indent=1))
        sys.exit(0)
    return args


class OneLineErrors(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        fail(message)


def read_pretrained(argv: list[str]) -> tuple[str, str, dict[str, Any]]:
    """``--pretrained`` (read first: the other flags' defaults depend on it), its kind
    (``momentum_contrast.convert.checkpoint_kind``) and its contents."""
    p = OneLineErrors(add_help=False)
    p.add_argument("--pretrained")
    path = p.parse_known_args(argv)[0].pretrained  # the last one given, as the full parser
    if not path:
        if {"-h", "--help"} & set(argv):  # the help, without a checkpoint's defaults
            build_parser(False, {"arch": None, "image_size": 224}).parse_args(["-h"])
        fail("--pretrained PATH (a pre-training checkpoint) is required")
    try:
        kind = checkpoint_kind(path)
    except OSError as e:  # no such file, a directory
        fail(f"--pretrained {e}")
    except LayoutError as e:
        fail(f"--pretrained {path}: {e}")
    return path, kind, torch.load(path, map_location="cpu", weights_only=True)


def validate(args: argparse.Namespace) -> None:
    world, a = int(os.environ.get("WORLD_SIZE", "1")), vars(args)
    for name in ("batch_size", "epochs", "lr", "image_size", "shapes_train", "shapes_val"):
        if not a[name] > 0 or not math.isfinite(a[name]):  # NaN and inf too
            fail(f"--{name.replace('_', '-')} must be positive and finite, got {a[name]}")
    if args.image_size > 4096:
        fail(f"--image-size {args.image_size}: the augmentation takes at most 4096 px")
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        fail(f"--output-dir {args.output_dir} is a file, not a folder")
    if args.workers < 0:
        fail(f"--workers must be >= 0, got {args.workers}")
    try:
        [int(m) for m in args.schedule_milestones.split(",")]
    except ValueError:
        fail(f"--schedule-milestones must be integers, got {args.schedule_milestones!r}")
    if args.arch.startswith("timm:"):
        try:
            import timm
        except ImportError:
            fail(f"--arch {args.arch}: timm is not installed (pip install timm)")
        if not timm.is_model(args.arch[5:]):
            fail(f"--arch {args.arch}: timm has no model {args.arch[5:]!r}")
    elif args.arch not in ARCHS:
        import torchvision

        if args.arch not in torchvision.models.list_models(module=torchvision.models):
            fail(f"--arch {args.arch} is not one of {', '.join(ARCHS)}, a torchvision "
                 "classification model or timm:NAME")  # fmt: skip
    if args.batch_size % world:
        fail(f"--batch-size {args.batch_size} does not split across {world} processes")
    if args.arch == "small_cnn" and args.image_size < 8:
        fail(f"--image-size {args.image_size} does not fit --arch small_cnn: it needs 8 px")
    patch = 16 if args.image_size >= 128 else 8
    if args.arch in VITS and args.image_size % patch:
        fail(f"--image-size {args.image_size} does not fit --arch {args.arch}: use a multiple "
             f"of {patch}")  # fmt: skip
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError):
        fail(f"--device {args.device!r} is not a device ('cpu', 'cuda')")
    if device.type not in ("cpu", "cuda"):
        fail(f"--device {args.device!r}: these scripts run on 'cpu' or 'cuda'")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {args.device}: CUDA is not available here (use --device cpu)")


# ---- Data: as in moco_v2.py, without the CPU augmentation (the crops are made on --device)
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
    """Images as a uint8 tensor (N, C, H, W) or a list of files, and their labels."""

    def __init__(self, items: Any, labels: torch.Tensor) -> None:
        self.items, self.labels = items, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        item = self.items[i]
        return (decode(item) if isinstance(item, str) else item), self.labels[i]


def datasets(args: argparse.Namespace) -> tuple[Images, Images, int]:
    """(train, held-out, classes): STL-10's labelled train split only; without a val/ folder
    the held-out split is the training set."""
    if args.data == "shapes":
        x, y = make_shapes(args.shapes_train + args.shapes_val, args.image_size, seed=1234)
        n = args.shapes_train
        return Images(x[:n], y[:n]), Images(x[n:], y[n:]), 10
    import torchvision.datasets as tvd

    if args.data in ("cifar10", "cifar100", "stl10"):

        def load(cls: Any, **split: Any) -> Any:  # a copy under --data-root, else downloaded
            try:
                return cls(args.data_root, download=False, **split)
            except RuntimeError:
                try:
                    return cls(args.data_root, download=True, **split)
                except Exception as e:
                    fail(f"--data {args.data}: no copy under --data-root {args.data_root} and "
                         f"the download failed ({type(e).__name__}: {e})")  # fmt: skip

        if args.data == "stl10":
            sets = [load(tvd.STL10, split=s) for s in ("train", "test")]
            x, y = (
                [torch.from_numpy(d.data) for d in sets],
                [torch.from_numpy(d.labels) for d in sets],
            )
            return Images(x[0], y[0].long()), Images(x[1], y[1].long()), 10
        cls = tvd.CIFAR10 if args.data == "cifar10" else tvd.CIFAR100
        sets = [load(cls, train=True), load(cls, train=False)]  # (N, 32, 32, 3) uint8
        x = [torch.from_numpy(d.data).permute(0, 3, 1, 2).contiguous() for d in sets]
        return *(Images(x[i], torch.tensor(sets[i].targets)) for i in (0, 1)), len(sets[0].classes)  # type: ignore[return-value]
    root = Path(args.data)
    if not (root / "train").is_dir():
        fail(f"--data {root} has no train/ folder (ImageFolder layout expected)")
    try:
        folders = [tvd.ImageFolder(str(root / s)) for s in ("train", "val") if (root / s).is_dir()]
    except FileNotFoundError as e:
        fail(f"{root} is empty or not in ImageFolder layout: {e}")
    if len(folders) == 2 and folders[1].classes != folders[0].classes:
        fail(f"{root}/val has other classes than {root}/train")
    train, *val = (Images([s for s, _ in d.samples], torch.tensor(d.targets)) for d in folders)
    return train, (val[0] if val else train), len(folders[0].classes)


def collate(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[Any, torch.Tensor]:
    """Stack the images (a list when their sizes differ) and the labels."""
    items, labels = zip(*batch, strict=True)
    same = all(i.shape == items[0].shape for i in items)
    return (torch.stack(items) if same else list(items)), torch.stack(labels)


def loader(data: Images, args: argparse.Namespace, batch: int, order: Any = None) -> Any:
    """Batches of ``data``: ``order`` (lists of indices), or every image in sequence."""
    return torch.utils.data.DataLoader(
        data, **({"batch_size": batch} if order is None else {"batch_sampler": order}),
        num_workers=0 if isinstance(data.items, torch.Tensor) else args.workers,
        collate_fn=collate, pin_memory=args.device.startswith("cuda"),
        generator=torch.Generator().manual_seed(args.seed),
    )  # fmt: skip


def evaluation_batches(data: Images, args: argparse.Namespace, device: torch.device) -> Any:
    """Every image resized to the training size and normalised (ImageNet's statistics)."""
    mean = torch.tensor((0.485, 0.456, 0.406), device=device).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225), device=device).view(1, 3, 1, 1)
    resize = {"size": (args.image_size, args.image_size), "mode": "bilinear", "antialias": True}
    for x, y in loader(data, args, 256):
        x = torch.cat([nn.functional.interpolate(i[None].to(device).float(), **resize) for i in x])
        yield (x / 255 - mean) / std, y.to(device)


# ---- The backbone: built as the pre-training scripts build it, then the checkpoint's weights
def backbone(
    arch: str, image_size: int, num_heads: int | None = None, keep_classifier: bool = False
) -> tuple[nn.Module, int]:
    finish = (lambda net: (net, 0)) if keep_classifier else strip_classifier
    if arch == "small_cnn":
        layers: list[nn.Module] = []
        for c_in, c_out in ((3, 32), (32, 64), (64, 128), (128, 256)):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out)]
            layers += [nn.ReLU(), nn.MaxPool2d(2) if c_out < 256 else nn.AdaptiveAvgPool2d(1)]
        return nn.Sequential(*layers, nn.Flatten()), 256
    if arch.startswith("timm:"):
        import timm

        return finish(timm.create_model(arch[5:], pretrained=False))
    import torchvision

    if arch in VITS:  # the head count: the checkpoint's record (the weights do not hold it)
        depth, heads, dim = VITS[arch]
        patch = 16 if image_size >= 128 else 8
        vit = torchvision.models.VisionTransformer(
            image_size, patch, depth, num_heads or heads, dim, 4 * dim)  # fmt: skip
        return finish(vit)
    size: dict[str, Any] = {"image_size": image_size} if arch.startswith("vit_") else {}
    if arch in ("googlenet", "inception_v3"):  # features only: no auxiliary classifiers
        size |= {"aux_logits": False, "init_weights": True}  # (their default, unwarned)
    net = torchvision.models.get_model(arch, weights=None, **size)
    if arch.startswith("resnet") and image_size <= 32:  # the CIFAR stem, as in pre-training
        net.conv1, net.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    return finish(net)


def attention_heads(model: nn.Module) -> int | None:
    heads = (getattr(m, "num_heads", None) for m in model.modules())
    return next((h for h in heads if isinstance(h, int)), None)


def pretrained_backbone(
    ckpt: dict[str, Any], kind: str, v3: bool, arch: str, known_heads: int | None = None
) -> tuple[dict[str, torch.Tensor], int | None]:
    """The query encoder's backbone weights, named as [`backbone`][] names them, and a ViT's
    number of attention heads as the checkpoint records it (None for other backbones);
    ``known_heads``: a torchvision ViT's by its name (vit_b_16), checked against a record."""
    if arch.startswith("vit"):  # the heads are not in the weights: convert reads the record
        spec = backbone_spec(ckpt, to="torchvision", num_heads=known_heads)
        heads = spec.kwargs["num_heads"] if spec is not None else None
        return backbone_state_dict(ckpt, to="torchvision", num_heads=known_heads), heads
    if kind == "state_dict" and not arch.startswith("resnet"):  # any other model's own names
        return {k: v for k, v in ckpt.items() if isinstance(v, torch.Tensor)}, None
    if kind != "project":  # torchvision names: the ResNets of backbone()
        return backbone_state_dict(ckpt, to="torchvision"), None
    prefix = "0.0." if v3 else "0."  # query encoder = Sequential(features, head) [+ predictor]
    state = {k.removeprefix("module."): v for k, v in ckpt["model"].items()}
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, None


def mismatches(own: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor]) -> str:
    """What keeps ``loaded`` from loading into a model whose state is ``own`` ('' if nothing)."""
    missing, unexpected = sorted(own.keys() - loaded.keys()), sorted(loaded.keys() - own.keys())
    shapes = sorted(k for k in own.keys() & loaded.keys() if own[k].shape != loaded[k].shape)
    return "; ".join(
        f"{len(names)} tensors {what} (first: {names[0]})"
        for what, names in (("missing", missing), ("unexpected", unexpected),
                            ("of another shape", shapes))
        if names
    )  # fmt: skip


def main() -> None:
    path, kind, ckpt = read_pretrained(sys.argv[1:])
    if kind == "project":  # the example scripts' checkpoint: its flags name arch and size
        v3, trained = ckpt["recipe"] == "moco_v3", ckpt["args"]
    else:  # the authors' checkpoints name their architecture; a state dict needs --arch
        v3 = kind == "official_v3"
        trained = {"arch": ckpt.get("arch") if ckpt.get("arch") in ARCHS else None}
        trained["image_size"] = 224
    args = parse_args(sys.argv[1:], v3, trained)
    if args.arch is None:
        fail(f"--pretrained {path} does not name its architecture: pass --arch")
    validate(args)
    # Set-up: one process, or one per GPU under torchrun
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    torch.manual_seed(args.seed)  # the backbone's initial weights (overwritten by the checkpoint)

    known = None
    if args.arch not in VITS:  # built once here; a torchvision vit_* name fixes its heads
        features, dim = backbone(args.arch, args.image_size)
        known = attention_heads(features) if args.arch.startswith("vit_") else None
    try:
        state, heads = pretrained_backbone(ckpt, kind, v3, args.arch, known)
    except LayoutError as e:
        fail(f"--pretrained {path}: {e}")
    if args.arch in VITS:  # this project's ViTs: the heads the checkpoint records
        features, dim = backbone(args.arch, args.image_size, num_heads=heads)
    if kind == "state_dict":  # a whole classification model's: without its classifier
        whole = backbone(args.arch, args.image_size, keep_classifier=True)[0].state_dict()
        head = whole.keys() - features.state_dict().keys()
        state = {k: v for k, v in state.items() if k not in head}
    if problems := mismatches(features.state_dict(), state):
        stem = args.arch.startswith("resnet") and args.image_size <= 32
        why = " (at --image-size 32 or less a ResNet has the CIFAR stem: 3x3 conv1, no max-pool)"
        fail(f"--pretrained {path} does not fit --arch {args.arch}: {problems}{why * stem}")
    features.load_state_dict(state)
    features.to(device).eval().requires_grad_(False)  # frozen, BatchNorm in eval mode
    frozen = {k: v.clone() for k, v in features.state_dict().items()}
    train, val, classes = datasets(args)
    if len(train) < args.batch_size:
        fail(f"--batch-size {args.batch_size} is larger than the {len(train)} training images: "
             "no full batch to train on (lower --batch-size)")  # fmt: skip
    if val is train and rank == 0:
        print(f"warning: {args.data} has no val/ folder: the accuracy is on the training images")
    # Seeded here, after every model is built (a state dict builds a second one to find the
    # classifier it drops): the classifier and the crops depend on --seed, not on the kind of
    # checkpoint; the same classifier on every rank
    torch.manual_seed(args.seed)
    classifier = nn.Linear(dim, classes).to(device)
    nn.init.normal_(classifier.weight, std=0.01)
    nn.init.zeros_(classifier.bias)
    if world > 1:
        classifier = nn.parallel.DistributedDataParallel(classifier)
    lr = args.lr * args.batch_size / 256 if v3 else args.lr
    optimizer = torch.optim.SGD(classifier.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    crop_flip = ViewRecipe(scale=(0.08, 1.0), jitter_p=0.0, grayscale_p=0.0)
    augment = TwoViewAugment(crop_flip, crop_flip, size=args.image_size).to(device)
    milestones = [int(m) for m in args.schedule_milestones.split(",")]

    # The loop: each rank its share of a permutation fixed by (seed, epoch)
    batch, steps = args.batch_size // world, len(train) // args.batch_size
    for epoch in range(args.epochs):
        g = torch.Generator().manual_seed(args.seed * 100_003 + epoch)
        order = torch.randperm(len(train), generator=g)[: steps * args.batch_size]
        order = order.view(steps, world, batch)[:, rank].tolist()
        bar = tqdm(loader(train, args, batch, order), total=steps, desc=f"epoch {epoch + 1}",
                   disable=rank != 0, mininterval=2, file=sys.stdout)  # fmt: skip
        for i, (images, labels) in enumerate(bar):
            at = epoch + i / steps
            if v3:
                step_lr = lr * 0.5 * (1 + math.cos(math.pi * at / args.epochs))
            else:
                step_lr = lr * 0.1 ** sum(at >= m for m in milestones)
            for group in optimizer.param_groups:
                group["lr"] = step_lr
            images = images.to(device) if isinstance(images, torch.Tensor) else [
                x.to(device) for x in images]  # fmt: skip
            x = augment(images)[0]
            with (
                torch.no_grad(),
                torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"),
            ):
                f = features(x).float()
            loss = nn.functional.cross_entropy(classifier(f), labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    top1 = top5 = total = 0
    with torch.no_grad():
        for x, y in evaluation_batches(val, args, device):
            top = classifier(features(x).float()).topk(min(5, classes), dim=1).indices
            top1 += int((top[:, 0] == y).sum())
            top5 += int((top == y[:, None]).any(dim=1).sum())
            total += len(y)
    if not all(torch.equal(v, frozen[k]) for k, v in features.state_dict().items()):
        fail("the frozen backbone changed during linear evaluation")
    result = {"pretrained": path, "top1": 100 * top1 / total, "top5": 100 * top5 / total,
              "images": total}  # fmt: skip
    if rank == 0:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(args.output_dir) / "linear_eval.json").write_text(json.dumps(result, indent=1))
    print(
        f"linear evaluation of {path}: top-1 {result['top1']:.1f}%, top-5 {result['top5']:.1f}% "
        f"on {total} held-out images (backbone unchanged)"
    )


if __name__ == "__main__":
    main()
