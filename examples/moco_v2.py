"""MoCo v2 (and v1) pre-training, built from momentum_contrast's pieces.

    python examples/moco_v2.py                                   # built-in shapes, CPU or GPU
    python examples/moco_v2.py --data cifar10 --data-root data   # the authors' CIFAR-10 demo
    python examples/moco_v2.py --data /data/imagenet --arch resnet50           # one GPU
    torchrun --nproc-per-node 8 examples/moco_v2.py --data /data/imagenet --arch resnet50
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --nnodes 4 --nproc-per-node 8 \\
        --rdzv-backend c10d --rdzv-endpoint HOST:29500 --rdzv-id RUN --max-restarts 3 \\
        examples/moco_v2.py --data /data/imagenet --batch-size 1024 --lr 0.12 \\
        --output-dir /shared/runs/v2 --resume auto --save-every 1000    # on every node
    python examples/moco_v2.py --resume auto                     # continue the last run
    python examples/moco_v2.py --accumulate 2                    # 2 micro-batches per step

On ImageNet the defaults are the paper's (ResNet-50, 200 epochs, batch 256, SGD lr 0.03, K
65,536, m 0.999, T 0.2, cosine schedule); CIFAR and STL-10 get the authors' CIFAR-10 demo
settings (with the v2 head; the demo's is linear), the built-in `shapes` data settings that
finish on a CPU in minutes. Read top to bottom: flags, the MoCo pieces and their step
(``build``), the loop (``main``). What a run needs besides MoCo (set-up, random states,
backbones, step log, kNN monitor, checkpoints) is in harness.py, monitoring.py and
checkpoints.py, the data in data.py. A checkpoint resumes exactly in as many processes, and
continues in any other number (with other per-process batches). Several nodes, restarts
after a lost process, Slurm (multi_node.sbatch): docs/guides/multi-node.md. Tested on the
CPU with gloo (torch 2.14.1): 1 and 2 processes, 2 torchrun agents on one machine, a process
killed and restarted by torchrun, a one-machine Slurm cluster; not tested here: NCCL, real
nodes.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import random
from pathlib import Path
from typing import Any

import torch
from checkpoints import (
    claim,
    load_resume,
    restore_rng,
    resume_states,
    rows_to_keep,
    save_checkpoint,
    saves_at,
    state_of,
)
from harness import (
    Env,
    OneLineParser,
    attention_heads,
    check_flags,
    checked_backbone,
    fail,
    fraction,
    leave,
    load_data,
    milestones,
    non_negative_float,
    number,
    parse_flags,
    pixels,
    positive_float,
    positive_int,
    run_flags,
    run_steps,
    setup,
    training_views,
    world_size,
)
from monitoring import (
    KnnMonitor,
    StepLog,
    report,
)
from torch import nn

from momentum_contrast import KeyQueue, MomentumEncoder, info_nce
from momentum_contrast.augment import MoCoV1Augment, MoCoV2Augment
from momentum_contrast.distributed import batch_shuffle, batch_unshuffle
from momentum_contrast.heads import moco_v1_head, moco_v2_head
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


def build_parser() -> argparse.ArgumentParser:
    """MoCo v1/v2's flags, then the run's (harness.run_flags: --data, --arch, --output-dir, ...)."""
    p = OneLineParser(description="MoCo v1/v2 pre-training")
    arg = p.add_argument
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
    arg("--shuffle-splits", type=positive_int, default=8, help="one process: BatchNorm "
        "splits of both encoders, as per-GPU BatchNorm")  # fmt: skip
    arg("--accumulate", type=positive_int, default=1, help="micro-batches per process and step")
    return run_flags(p)


def parse_args(argv: list[str] | None = None, version: str = "v2") -> argparse.Namespace:
    parser = build_parser()
    data = parser.parse_known_args(argv)[0].data
    parser.set_defaults(temperature=0.2 if version == "v2" else 0.07)  # the papers' T
    parser.set_defaults(**RECIPES.get(data, {}))  # the data set's recipe, over the paper's
    other = "schedule_milestones" if version == "v2" else "blur_p"  # the other paper's: unset
    parser.set_defaults(**{other: None})
    if getattr(parser.parse_known_args(argv)[0], other) is not None:  # before --print-config
        uses = "a cosine schedule" if version == "v2" else "no blur"
        fail(f"--{other.replace('_', '-')} is not MoCo {version}'s: it has {uses}")
    return parse_flags(parser, argv)


def validate(args: argparse.Namespace, *, blur: bool) -> None:
    """The flags that must fit together (argparse checked each alone), and the processes:
    harness.check_flags, with Shuffle-BN's splits of a micro-batch in one process."""
    world, splits = world_size(), args.shuffle_splits
    micro = args.batch_size // world // args.accumulate
    shuffle = f"--shuffle-splits {splits} does not split the {micro} images of a (micro-)batch"
    check_flags(args, (world == 1 and micro % splits, shuffle), blur=blur)


# ---- MoCo v1/v2: a backbone, the paper's head, the key encoder, the queue and the step
def build(args: argparse.Namespace, version: str, env: Env) -> Any:
    """(pieces, train_step, augment, features) of MoCo ``version`` ('v1' or 'v2')."""
    device, _, world = env
    features, feature_dim = checked_backbone(args.arch, args.image_size)
    head = (moco_v2_head if version == "v2" else moco_v1_head)(feature_dim, out_dim=args.dim)
    model: nn.Module = nn.Sequential(features, head).to(device)  # the query encoder
    if world == 1 and args.shuffle_splits > 1:  # one process: BatchNorm per split, as per GPU
        convert_split_batchnorm(model, args.shuffle_splits)  # (the key encoder is its copy)
    if world > 1:  # the query encoder trains under DDP; the key encoder uses Shuffle-BN
        ids = [device] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    key_encoder = MomentumEncoder(model, momentum=args.moco_momentum)
    queue = KeyQueue(args.queue_size, args.dim).to(device)  # (K, dim) unit-norm keys
    sgd = {"lr": args.lr, "momentum": 0.9, "weight_decay": args.weight_decay}
    optimizer = torch.optim.SGD(model.parameters(), **sgd)
    augment: nn.Module
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
    ddp = model if isinstance(model, nn.parallel.DistributedDataParallel) else None
    n = args.accumulate
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
                ddp.no_sync() if ddp is not None and i < n - 1 else contextlib.nullcontext(),
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


# ---- Resuming (harness.load_resume): the flags a checkpoint's must equal, and those whose
# change is a warning
MUST_MATCH = ("arch", "dim", "queue_size")  # the tensors' shapes
WARN_IF_CHANGED = ("batch_size", "epochs", "seed", "lr", "image_size", "data", "augment_on",
                   "moco_momentum", "temperature", "weight_decay", "schedule_milestones",
                   "crop_min", "blur_p", "shapes_train", "shapes_val", "knn_bank", "knn_queries",
                   "accumulate", "shuffle_splits")  # fmt: skip


# ---- The loop: epochs of steps; at each epoch's end the kNN monitor and a checkpoint
def main(version: str = "v2") -> None:
    args = parse_args(version=version)
    validate(args, blur=version == "v2" and args.blur_p > 0)
    recipe, out = f"moco_{version}", Path(args.output_dir)
    lock = claim(args.output_dir)  # held to the end: no second run writes there meanwhile
    resume = load_resume(args, recipe, MUST_MATCH, WARN_IF_CHANGED)  # before anything is built
    _, rank, world = env = setup(args)
    pieces, train_step, augment, features = build(args, version, env)
    train, val, classes = load_data(args)
    steps_per_epoch, last = run_steps(args, len(train))
    step, baseline, saved_rng = resume_states(resume, pieces, env, steps_per_epoch, out)
    knn = KnnMonitor(features, (train, val, classes), args, env)  # measured on rank 0
    if baseline is None:
        baseline = knn(step, "kNN top-1 at random initialisation: {value:.1f}%")
    log = StepLog(out / "metrics.csv" if rank == 0 else None, args.log_every, args.batch_size,
                  keep=rows_to_keep(resume, out))  # fmt: skip
    restore_rng(saved_rng, args.seed, rank, world, step)  # from here each rank its own stream
    meta = {"recipe": recipe, "args": vars(args), "knn_baseline": baseline,
            "num_heads": attention_heads(args.arch, features),
            "steps_per_epoch": steps_per_epoch}  # fmt: skip
    for x_q, x_k in training_views(args, train, augment, log, env, step=step, last=last):
        stats = train_step(x_q, x_k, step / steps_per_epoch)  # the epoch, a float
        step, epoch = step + 1, step // steps_per_epoch
        if log.add(step, epoch, stats["loss"], stats["lr"], stats["momentum"]):
            log.flush()  # one read of the last --log-every losses
        if saves_at(args, step, steps_per_epoch, last):  # an epoch's end, the stop, --save-every
            log.flush()  # its last steps, before the kNN monitor and the checkpoint
            if step % steps_per_epoch == 0:
                value = knn(step, "epoch {epoch}: kNN top-1 {value:.1f}%", epoch=epoch + 1)
                log.write({"step": step, "epoch": epoch, "knn_top1": round(value, 2)})
            save_checkpoint(out, state_of(pieces), meta, step, env, args.keep)
    report(step, knn.final(step), baseline, out, env)  # the kNN of the weights at the stop
    if lock is not None:
        lock.close()


if __name__ == "__main__":
    main("v2")
    leave()  # after main: its models let go of the process group
