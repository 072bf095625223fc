"""Linear evaluation of a pre-trained backbone: frozen features, a trained linear classifier.

    python examples/linear_eval.py --pretrained runs/example/checkpoint_0001860.pt
    torchrun --nproc-per-node 8 examples/linear_eval.py --data /data/imagenet \\
        --pretrained runs/moco_v2/checkpoint_1000800.pt
    torchrun --nproc-per-node 8 examples/linear_eval.py --data /data/imagenet \\
        --pretrained moco_v2_800ep_pretrain.pth.tar          # the MoCo authors' checkpoint

``--pretrained`` takes a checkpoint of these scripts, a MoCo v1/v2/v3 checkpoint released
by the authors (ResNet, or ViT with ``--arch vit_small``/``vit_base`` at 224 px), or a
plain state dict of a backbone (then ``--arch`` is required). A ViT is built with the
number of attention heads the checkpoint records (the weights do not hold it).

The protocol follows the reference code: the backbone is frozen with its BatchNorm in eval
mode; a linear layer (weights ~ N(0, 0.01), zero bias) is trained with SGD, momentum 0.9,
no weight decay, on random-resized crops and flips: MoCo v1/v2 lr 30 for 100 epochs,
divided by 10 at 60 and 80; MoCo v3 lr 0.1 x batch/256 for 90 epochs, cosine. Reports
top-1 and top-5 on the held-out split, and checks that the backbone did not change.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, NoReturn

import torch
from common import (
    ARCHS,
    backbone,
    check_steps,
    cosine_lr,
    datasets,
    evaluation_batches,
    loader,
    parse_args,
    setup,
    to_device,
    validate,
)
from flags import Defaults, fail
from torch import nn
from tqdm import tqdm

from momentum_contrast.augment import TwoViewAugment, ViewRecipe
from momentum_contrast.convert import (
    LayoutError,
    backbone_spec,
    backbone_state_dict,
    checkpoint_kind,
)

PAPER_DEFAULTS = {"epochs": 100, "batch_size": 256, "lr": 30.0, "schedule_milestones": "60,80",
                  "shapes_train": 4000, "shapes_val": 1000}  # fmt: skip
V3_DEFAULTS = {"epochs": 90, "batch_size": 1024, "lr": 0.1}
SHAPES_DEFAULTS = {"epochs": 5, "batch_size": 64, "schedule_milestones": "3,4"}


def layers(v3: bool, trained: dict[str, Any]) -> Defaults:
    """Defaults in order of priority; the architecture and size are the checkpoint's."""
    this_run = {"pretrained": "", "arch": trained["arch"], "image_size": trained["image_size"]}
    return [
        (lambda a: a.data == "shapes", SHAPES_DEFAULTS),
        (lambda a: v3, V3_DEFAULTS),
        (lambda a: True, {**PAPER_DEFAULTS, **this_run}),
    ]


def pretrained_backbone(
    ckpt: dict[str, Any], kind: str, v3: bool, arch: str
) -> tuple[dict[str, torch.Tensor], int | None]:
    """The query encoder's backbone, named as ``common.backbone`` names it, and a ViT's
    number of attention heads as the checkpoint records it (None for other backbones)."""
    if arch.startswith("vit"):  # the heads are not in the weights: convert reads the record
        spec = backbone_spec(ckpt, to="torchvision")
        heads = spec.kwargs["num_heads"] if spec is not None else None
        return backbone_state_dict(ckpt, to="torchvision"), heads
    if kind != "project":  # torchvision names: the ResNets of common.backbone
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


class _PretrainedParser(argparse.ArgumentParser):
    """Reads ``--pretrained`` alone, before the other flags (their defaults depend on the
    checkpoint), as the full parser will: the last one given wins; errors in one line."""

    def error(self, message: str) -> NoReturn:
        fail(message)


def pretrained_flag(argv: list[str]) -> str:
    """The ``--pretrained`` path of ``argv``, or a one-line error and exit."""
    p = _PretrainedParser(add_help=False)
    p.add_argument("--pretrained")
    pretrained = p.parse_known_args(argv)[0].pretrained
    if not pretrained:
        if {"-h", "--help"} & set(argv):  # the help (without a checkpoint's defaults)
            parse_args("Linear evaluation", layers(False, {"arch": None, "image_size": 224}))
        fail("--pretrained PATH (a pre-training checkpoint) is required")
    return str(pretrained)


def main() -> None:
    pretrained = pretrained_flag(sys.argv[1:])
    try:
        kind = checkpoint_kind(pretrained)
    except OSError as e:  # no such file, a directory
        fail(f"--pretrained {e}")
    except LayoutError as e:
        fail(f"--pretrained {pretrained}: {e}")
    ckpt = torch.load(pretrained, map_location="cpu", weights_only=True)
    if kind == "project":
        v3, trained = ckpt["recipe"] == "moco_v3", ckpt["args"]
    else:  # the authors' checkpoints name their architecture; a state dict needs --arch
        v3 = kind == "official_v3"
        trained = {"arch": ckpt.get("arch") if ckpt.get("arch") in ARCHS else None}
        trained["image_size"] = 224
    args = parse_args("Linear evaluation", layers(v3, trained))
    if args.arch is None:
        fail(f"--pretrained {pretrained} does not name its architecture: pass --arch")
    validate(args, blur=False)
    device, rank, world = setup(args)

    try:
        state, heads = pretrained_backbone(ckpt, kind, v3, args.arch)
    except LayoutError as e:
        fail(f"--pretrained {pretrained}: {e}")
    features, dim = backbone(args.arch, args.image_size, num_heads=heads)
    if problems := mismatches(features.state_dict(), state):
        fail(f"--pretrained {pretrained} does not fit --arch {args.arch}: {problems}")
    features.load_state_dict(state)
    features.to(device).eval().requires_grad_(False)  # frozen, BatchNorm in eval mode
    frozen = {k: v.clone() for k, v in features.state_dict().items()}
    train, val, classes = datasets(args, labelled_only=True)  # STL-10: no unlabeled split
    steps = check_steps(len(train), args.batch_size)
    if val is train and rank == 0:
        print(f"warning: {args.data} has no val/ folder: the accuracy is on the training images")
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
    for epoch in range(args.epochs):
        batches = loader(
            train, args, args.batch_size // world, epoch=epoch, start=0, rank=rank, world=world
        )
        for i, (images, labels) in enumerate(
            tqdm(
                batches,
                total=steps,
                desc=f"epoch {epoch + 1}",
                disable=rank != 0,
                mininterval=2,
                file=sys.stdout,
            )
        ):
            at = epoch + i / steps
            step_lr = (
                cosine_lr(lr, at, args.epochs)
                if v3
                else lr * 0.1 ** sum(at >= m for m in milestones)
            )
            for group in optimizer.param_groups:
                group["lr"] = step_lr
            x = augment(to_device(images, device))[0]
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
    unchanged = all(torch.equal(v, frozen[k]) for k, v in features.state_dict().items())
    if not unchanged:
        sys.exit("error: the frozen backbone changed during linear evaluation")
    print(
        f"linear evaluation of {pretrained}: top-1 {100 * top1 / total:.1f}%, "
        f"top-5 {100 * top5 / total:.1f}% on {total} held-out images (backbone unchanged)"
    )


if __name__ == "__main__":
    main()
