"""Linear evaluation of a pre-trained backbone: frozen features, a linear classifier.

    python examples/linear_eval.py --pretrained runs/example/checkpoint_0001860.pt
    torchrun --nproc-per-node 8 examples/linear_eval.py --data /data/imagenet \\
        --pretrained runs/moco_v2/checkpoint_1000800.pt
    torchrun --nproc-per-node 8 examples/linear_eval.py --data /data/imagenet \\
        --pretrained moco_v2_800ep_pretrain.pth.tar          # the MoCo authors' checkpoint

``--pretrained`` takes a checkpoint of the example scripts, a MoCo v1/v2/v3 checkpoint
released by the authors (ResNet, or ViT with ``--arch vit_small``/``vit_base`` at 224 px), or
a plain state dict of a backbone (then ``--arch`` is required); ``momentum_contrast.convert``
reads each by its content. A ViT gets the number of attention heads its checkpoint records
(a plain state dict records none: give ``--num-heads``).

The protocol follows the reference code: the backbone is frozen with its BatchNorm in eval
mode; a linear layer (weights ~ N(0, 0.01), zero bias) is trained with SGD, momentum 0.9, no
weight decay, on random-resized crops and flips: MoCo v1/v2 lr 30 for 100 epochs, divided by
10 at 60 and 80; MoCo v3 lr 0.1 x batch/256 (ViTs: 3 x batch/256) for 90 epochs, cosine.
Held-out image files are resized to 256/224 of the crop size on their shorter side and
center-cropped; the built-in data sets, stored at one size, are resized to the crop size.
``--protocol`` picks one (default: the checkpoint's recipe; v1/v2 for a plain state dict).
Reports top-1 and top-5 on the held-out split (also in --output-dir/linear_eval.json) and
checks the backbone is unchanged.
The flag helpers, the set-up and the backbones are the pre-training scripts' (harness.py); the
data comes from data.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from checkpoints import damaged_record
from data import epoch_batches, evaluation_batches, loader, to_device
from harness import (
    ARCHS,
    VITS,
    OneLineParser,
    attention_heads,
    backbone,
    check_flags,
    check_steps,
    checked_backbone,
    fail,
    is_vit,
    leave,
    load_data,
    milestones,
    non_negative_int,
    parse_flags,
    pixels,
    positive_float,
    positive_int,
    seed,
    setup,
)
from torch import nn
from tqdm import tqdm

from momentum_contrast.augment import TwoViewAugment, ViewRecipe
from momentum_contrast.convert import (
    LayoutError,
    backbone_spec,
    backbone_state_dict,
    checkpoint_kind,
)

# ---- Flags: the protocol's defaults (v1/v2 in the parser, V3), the shapes ones, the command line
V3 = {"epochs": 90, "batch_size": 1024, "lr": 0.1}
V3_VIT = {"lr": 3.0}  # the authors' ViT linear probes (their CONFIG.md: --lr=3)
SHAPES = {"epochs": 5, "batch_size": 64, "schedule_milestones": "3,4"}


def build_parser(v3: bool, trained: dict[str, Any]) -> argparse.ArgumentParser:
    """The flags; ``trained``: the architecture, image size and data the checkpoint names."""
    p = OneLineParser(description="Linear evaluation")
    arg, cpus = p.add_argument, min(8, os.cpu_count() or 1)
    arg("--pretrained", help="checkpoint to evaluate (required): the example scripts', the "
        "MoCo authors' v1/v2/v3, or a backbone's state dict (then give --arch)")  # fmt: skip
    arg("--arch", default=trained["arch"], help=f"{', '.join(ARCHS)}, torchvision's or timm:NAME"
        " (default: the checkpoint's)")  # fmt: skip
    arg("--num-heads", type=positive_int, help=f"{', '.join(VITS)}: the attention heads, where "
        "the checkpoint does not record them (a plain state dict)")  # fmt: skip
    arg("--image-size", type=pixels, default=trained["image_size"], help="side of the crops (px)")
    arg("--data", default=trained.get("data", "shapes"), help="shapes (built in), cifar10, "
        "cifar100, stl10 or a folder (default: the checkpoint's pre-training data)")  # fmt: skip
    arg("--data-root", default=trained.get("data_root", "data"), help="where cifar10, cifar100 "
        "and stl10 are (or go); default: the checkpoint's")  # fmt: skip
    arg("--protocol", choices=("v1v2", "v3"), default="v3" if v3 else "v1v2", help="the linear "
        "protocol and its defaults (default: the recipe of the checkpoint, v1v2 for a state "
        "dict)")  # fmt: skip
    arg("--epochs", type=positive_int, default=100, help="epochs (v1/v2 100, v3 90; --data "
        "shapes 5)")  # fmt: skip
    arg("--batch-size", type=positive_int, default=256, help="total over all processes")
    arg("--lr", type=positive_float, default=30.0, help="learning rate (v1/v2 30; v3 0.1, ViTs 3, "
        "times batch/256)")  # fmt: skip
    arg("--schedule-milestones", type=milestones, default="60,80", help="v1/v2: lr / 10 at epochs")
    arg("--shapes-train", type=positive_int, default=4000, help="--data shapes: training images")
    arg("--shapes-val", type=positive_int, default=1000, help="--data shapes: held-out images")
    arg("--workers", type=non_negative_int, default=cpus, help="loader processes per process")
    arg("--seed", type=seed, default=0, help="seed of the classifier and the training order")
    arg("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
        help="one GPU per process under torchrun")  # fmt: skip
    arg("--output-dir", default="runs/linear_eval", help="linear_eval.json (the result) goes here")
    arg("--print-config", action="store_true", help="print the resolved settings and exit")
    p.set_defaults(**(V3 if v3 else {}))
    return p


def parse_args(argv: list[str], v3: bool, trained: dict[str, Any]) -> argparse.Namespace:
    parser = build_parser(v3, trained)
    if (parser.parse_known_args(argv)[0].protocol == "v3") != v3:  # the other protocol's defaults
        parser = build_parser(not v3, trained)
    known = parser.parse_known_args(argv)[0]
    if known.protocol == "v3" and is_vit(known.arch or ""):
        parser.set_defaults(**V3_VIT)
    if known.data == "shapes":
        parser.set_defaults(**SHAPES)
    return parse_flags(parser, argv)


def read_pretrained(argv: list[str]) -> tuple[str, str, dict[str, Any]]:
    """``--pretrained`` (read first: the other flags' defaults depend on it), its kind
    (``momentum_contrast.convert.checkpoint_kind``) and its contents."""
    p = OneLineParser(add_help=False)
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
    # torch.load reads no checksum; a file in torch's legacy format (before 1.6) is no zip
    if zipfile.is_zipfile(path) and (damaged := damaged_record(Path(path))):
        fail(f"--pretrained {path}: {damaged}")
    return path, kind, torch.load(path, map_location="cpu", weights_only=True)


def validate(args: argparse.Namespace) -> None:
    """The flags that must fit together (argparse checked each alone), and the processes."""
    heads_fixed = args.num_heads is not None and args.arch not in VITS
    check_flags(args, (heads_fixed, f"--num-heads applies to {', '.join(VITS)}"))


# ---- The backbone: built as the pre-training scripts build it, then the checkpoint's weights
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


def load_backbone(args: argparse.Namespace, path: str, kind: str, ckpt: Any, v3: bool) -> Any:
    """The frozen backbone (BatchNorm in eval mode) with the checkpoint's weights, its size."""
    # a bad --arch stops in one line; a torchvision vit_* fixes its heads
    features, dim = checked_backbone(args.arch, args.image_size)
    # ours: recorded in the checkpoint, else --num-heads; torchvision's vit_b_16: its name's
    known = args.num_heads if args.arch in VITS else attention_heads(args.arch, features)
    try:
        state, heads = pretrained_backbone(ckpt, kind, v3, args.arch, known)
    except ValueError as e:  # a LayoutError, or --num-heads against the record or the width
        fail(f"--pretrained {path}: {e}")
    if args.arch in VITS:  # this project's ViTs: the heads the checkpoint records
        features, dim = backbone(args.arch, args.image_size, num_heads=heads)
    if kind == "state_dict":  # a whole classification model's: without its classifier
        whole = backbone(args.arch, args.image_size, keep_classifier=True)[0].state_dict()
        head = whole.keys() - features.state_dict().keys()
        state = {k: v for k, v in state.items() if k not in head}
    if problems := mismatches(own := features.state_dict(), state):
        # a ResNet's stem follows the image size: conv1 tells the weights' from the model's
        conv1 = [
            t.shape for t in (own.get("conv1.weight"), state.get("conv1.weight")) if t is not None
        ]
        stem = args.arch.startswith("resnet") and len(conv1) == 2 and conv1[0] != conv1[1]
        why = (" (a ResNet's conv1 is 3x3 with no max-pool, the CIFAR stem, at --image-size "
               "32 or less, 7x7 above: pass the --image-size of the pre-training)")  # fmt: skip
        fail(f"--pretrained {path} does not fit --arch {args.arch}: {problems}{why * stem}")
    if broken := [k for k, v in state.items() if v.is_floating_point() and not v.isfinite().all()]:
        fail(f"--pretrained {path}: {len(broken)} weights hold NaN or infinite values (first: "
             f"{broken[0]}): the pre-training diverged")  # fmt: skip
    features.load_state_dict(state)
    return features.eval().requires_grad_(False), dim


# ---- The loop: each rank its share of a permutation fixed by (seed, epoch), then the held-out
def main() -> None:
    path, kind, ckpt = read_pretrained(sys.argv[1:])
    if kind == "project":  # the example scripts' checkpoint: its flags name arch and size
        v3, trained = ckpt["recipe"] == "moco_v3", ckpt["args"]
    else:  # the authors' checkpoints name their architecture; a state dict needs --arch
        v3 = kind == "official_v3"
        trained = {"arch": ckpt.get("arch") if ckpt.get("arch") in ARCHS else None}
        trained["image_size"] = 224
    args = parse_args(sys.argv[1:], v3, trained)
    v3_protocol = args.protocol == "v3"  # v3: the checkpoint's layout (its query encoder's prefix)
    if args.arch is None:
        fail(f"--pretrained {path} does not name its architecture: pass --arch")
    validate(args)
    try:  # where the result goes: found out now, not after the training
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=args.output_dir).close()
    except OSError as e:
        fail(f"--output-dir {args.output_dir}: cannot write there ({type(e).__name__}: {e})")
    device, rank, world = setup(args)  # torchrun's processes; seeds the backbone (then loaded)
    features, dim = load_backbone(args, path, kind, ckpt, v3)
    features.to(device)
    frozen = {k: v.clone() for k, v in features.state_dict().items()}
    train, val, classes = load_data(args, unlabeled=False)  # STL-10's labelled train split only
    steps = check_steps(len(train), args.batch_size)
    if val is train and rank == 0:
        print(f"warning: {args.data} has no val/ folder: the accuracy is on the training images")
    # Seeded after every model is built (a state dict builds a second one to find the classifier
    # it drops): the classifier and crops depend on --seed only; the same one on every rank
    torch.manual_seed(args.seed)
    linear = nn.Linear(dim, classes).to(device)
    nn.init.normal_(linear.weight, std=0.01)
    nn.init.zeros_(linear.bias)
    classifier: nn.Module = linear
    if world > 1:
        classifier = nn.parallel.DistributedDataParallel(classifier)
    lr = args.lr * args.batch_size / 256 if v3_protocol else args.lr
    optimizer = torch.optim.SGD(classifier.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    crop_flip = ViewRecipe(scale=(0.08, 1.0), jitter_p=0.0, grayscale_p=0.0)
    augment = TwoViewAugment(crop_flip, crop_flip, size=args.image_size).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    for epoch in range(args.epochs):
        batches = epoch_batches(len(train), args.batch_size // world, seed=args.seed, epoch=epoch,
                                rank=rank, world=world)  # fmt: skip
        bar = tqdm(loader(train, batches, workers=args.workers, seed=args.seed), total=steps,
                   desc=f"epoch {epoch + 1}", disable=rank != 0, mininterval=2,
                   file=sys.stdout)  # fmt: skip
        for i, (images, labels) in enumerate(bar):
            at = epoch + i / steps  # the epoch, a float
            if v3_protocol:
                step_lr = lr * 0.5 * (1 + math.cos(math.pi * at / args.epochs))
            else:
                step_lr = lr * 0.1 ** sum(at >= int(m) for m in args.schedule_milestones.split(","))
            for group in optimizer.param_groups:
                group["lr"] = step_lr
            x = augment(to_device(images, device))[0]  # (N, 3, H, W) crops
            with torch.no_grad(), autocast:
                f = features(x).float()  # (N, dim) frozen features
            loss = nn.functional.cross_entropy(classifier(f), labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    top1 = top5 = total = 0
    with torch.no_grad():
        for x, y in evaluation_batches(val, args.image_size, device, workers=args.workers):
            top = classifier(features(x).float()).topk(min(5, classes), dim=1).indices
            top1 += int((top[:, 0] == y).sum())
            top5 += int((top == y[:, None]).any(dim=1).sum())
            total += len(y)
    if not all(torch.equal(v, frozen[k]) for k, v in features.state_dict().items()):
        fail("the frozen backbone changed during linear evaluation")
    result = {"pretrained": path, "top1": 100 * top1 / total, "top5": 100 * top5 / total,
              "images": total}  # fmt: skip
    if rank == 0:  # every rank evaluated the whole held-out split: one says it
        (Path(args.output_dir) / "linear_eval.json").write_text(json.dumps(result, indent=1))
        print(
            f"linear evaluation of {path}: top-1 {result['top1']:.1f}%, top-5 "
            f"{result['top5']:.1f}% on {total} held-out images (backbone unchanged)"
        )


if __name__ == "__main__":
    main()
    leave()  # after main: its models let go of the process group
