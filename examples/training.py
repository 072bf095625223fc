"""The loop around a recipe's training step: epochs, resume, checkpoints, progress, metrics."""

from __future__ import annotations

import argparse
import copy
import csv
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from checkpoints import (
    debug_dump,
    load_states,
    reseed,
    restore_rng,
    rng_states,
    save_checkpoint,
    state_of,
    truncate_metrics,
)
from common import vit_heads
from flags import check_steps
from image_data import Images, loader, to_device
from knn_monitor import knn_accuracy
from step_log import StepLog
from torch import nn

Step = Callable[[torch.Tensor, torch.Tensor, float], dict[str, Any]]
# What the kNN monitor embeds with: the backbone, or (FSDP) a collective that returns an
# unsharded copy of it on rank 0 (called on every rank).
Features = nn.Module | Callable[[], nn.Module]


class Recipe(NamedTuple):
    """What a recipe's ``build`` returns: the first arguments of [`fit`][]."""

    stateful: dict[str, Any]  # saved in checkpoints: objects with state_dict/load_state_dict
    train_step: Step
    augment: Callable[[Any], tuple[torch.Tensor, torch.Tensor]]
    features: Features


FIELDS = ["step", "epoch", "loss", "lr", "momentum", "images_per_s", "knn_top1"]


def plot(output_dir: Path, rows: list[dict[str, str]]) -> None:
    """``metrics.png``: the loss per step and the kNN accuracy per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [int(r["step"]) for r in rows if r["loss"]]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.plot(steps, [float(r["loss"]) for r in rows if r["loss"]], lw=0.8)
    a.set(xlabel="step", ylabel="loss", title="pre-training loss")
    knn = [(int(r["step"]), float(r["knn_top1"])) for r in rows if r["knn_top1"]]
    if knn:
        b.plot(*zip(*knn, strict=True), marker="o")
    b.set(xlabel="step", ylabel="kNN top-1 (%)", title="held-out kNN accuracy")
    fig.tight_layout()
    fig.savefig(output_dir / "metrics.png", dpi=100)
    plt.close(fig)


def fit(
    args: argparse.Namespace,
    recipe: str,
    stateful: dict[str, Any],
    train_step: Step,
    augment: Callable[[Any], tuple[torch.Tensor, torch.Tensor]],
    features: Features,
    data: tuple[Images, Images, int],
    env: tuple[torch.device, int, int],
    resume: tuple[Path, dict[str, Any]] | None,
) -> None:
    """Train ``args.epochs`` epochs of ``train_step`` on two views per image.

    Every rank calls ``state_dict`` of the ``stateful`` objects at a checkpoint (under
    FSDP that is a collective) and rank 0 saves them. ``env`` is ``(device, rank,
    world_size)`` from ``common.setup``; ``resume`` is what ``checkpoints.load_resume``
    returned (read before the models were built)."""
    from tqdm import tqdm

    train, val, classes = data
    device, rank, world = env
    if args.augment_on == "cpu":  # two views made per image in the loader workers
        train = Images(train.items, train.labels, transform=copy.deepcopy(augment).cpu())
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    steps_per_epoch = check_steps(len(train), args.batch_size)
    metrics = out / "metrics.csv"
    step, baseline = 0, None
    if resume is not None:
        path, ckpt = resume
        load_states(stateful, ckpt)
        step, baseline = ckpt["step"], ckpt["knn_baseline"]
        if rank == 0 and metrics.exists():  # rows a crashed run wrote after its checkpoint
            truncate_metrics(metrics, step)
        print(f"resumed from {path} at step {step}")
        debug_dump(stateful, rank, "loaded")

    def knn_now() -> float:  # on rank 0; under FSDP every rank gathers the weights first
        module = features if isinstance(features, nn.Module) else features()
        return knn_accuracy(module, train, val, classes, args, device) if rank == 0 else 0.0

    if baseline is None:
        baseline = knn_now()  # measured on rank 0 only: the other ranks hold 0.0
        if rank == 0:
            print(f"kNN top-1 at random initialisation: {baseline:.1f}%")
    if rank == 0 and (resume is None or not metrics.exists()):
        with open(metrics, "w", newline="") as f:
            csv.DictWriter(f, FIELDS).writeheader()
    if resume is not None:  # every rank its own generators, as saved
        restore_rng(resume[1]["rng"], args, rank, world, step)
    else:  # the models were built from --seed on every rank alike; now each its own stream
        reseed(args.seed, rank, 0)

    def checkpoint(tag: str) -> None:
        rng = rng_states(device)  # every rank's, gathered (a collective)
        debug_dump(stateful, rank, tag)
        state = state_of(stateful)  # on every rank: a collective under FSDP
        if rank == 0:
            state.update(recipe=recipe, step=step, rng=rng, args=vars(args), knn_baseline=baseline)
            state.update(num_heads=vit_heads(args.arch))  # a ViT's heads: not in the weights
            save_checkpoint(out / f"checkpoint_{tag}.pt", state)
            for old in out.glob("checkpoint_*.pt"):  # keep only the newest
                if old.name != f"checkpoint_{tag}.pt":
                    old.unlink()

    def log(row: dict[str, Any]) -> None:
        if rank == 0:
            with open(metrics, "a", newline="") as f:
                csv.DictWriter(f, FIELDS).writerow({k: row.get(k, "") for k in FIELDS})

    total = args.epochs * steps_per_epoch
    steps = StepLog(args.log_every, args.batch_size, log)
    last = min(args.max_steps, total) if args.max_steps else total
    knn = baseline
    while step < last:
        epoch, start = divmod(step, steps_per_epoch)
        batches = loader(
            train, args, args.batch_size // world, epoch=epoch, start=start, rank=rank, world=world
        )
        bar = tqdm(
            batches,
            total=steps_per_epoch,
            initial=start,
            disable=rank != 0,
            mininterval=2,
            desc=f"epoch {epoch + 1}/{args.epochs}",
            file=sys.stdout,
        )
        for images, _ in bar:
            views = (
                to_device(images, device)
                if isinstance(images, tuple)
                else augment(to_device(images, device))
            )
            stats = train_step(*views, epoch + (step - epoch * steps_per_epoch) / steps_per_epoch)
            step += 1
            steps.add(step, epoch, stats["loss"], stats["lr"], stats["momentum"])  # no host read
            if steps.due(step):
                steps.flush()  # one read of the last --log-every losses
                bar.set_postfix(
                    loss=f"{steps.last['loss']:.3f}",
                    lr=f"{steps.last['lr']:.3g}",
                    m=f"{steps.last['momentum']:.4f}",
                    img_s=f"{steps.last['img_s']:.0f}",
                )
            if step == last or step % steps_per_epoch == 0:
                break
        bar.close()
        steps.flush()  # the epoch's (or run's) last steps, before the kNN and the checkpoint
        if step % steps_per_epoch == 0:
            knn = knn_now()
        if step % steps_per_epoch == 0 and rank == 0:
            log({"step": step, "epoch": epoch, "knn_top1": round(knn, 2)})
            with open(metrics) as f:
                plot(out, list(csv.DictReader(f)))
            print(f"epoch {epoch + 1}: kNN top-1 {knn:.1f}%")
        checkpoint(f"{step:07d}")
    if rank == 0:
        peak = ""
        if device.type == "cuda":
            peak = f"; peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
        print(
            f"done: {step} steps; kNN top-1 {knn:.1f}% (random initialisation {baseline:.1f}%)"
            f"{peak}; checkpoints and metrics in {out}"
        )
