"""MoCo v2 (and v1) pre-training, built from momentum_contrast's pieces.

    python examples/moco_v2.py                                   # built-in shapes, CPU or GPU
    python examples/moco_v2.py --data /data/imagenet --arch resnet50           # one GPU
    torchrun --nproc-per-node 8 examples/moco_v2.py --data /data/imagenet --arch resnet50
    torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        examples/moco_v2.py --data /data/imagenet --arch resnet50 --batch-size 1024 --lr 0.12
    python examples/moco_v2.py --resume auto                     # continue the last run
    python examples/moco_v2.py --accumulate 2                    # 2 micro-batches per step

On ImageNet the defaults are the paper's (ResNet-50, 200 epochs, batch 256, SGD lr 0.03,
K 65,536, m 0.999, T 0.2, cosine schedule); with the built-in `shapes` data they are
scaled down to finish on a CPU in minutes (see examples/README.md).
"""

from __future__ import annotations

import argparse

import torch
from accumulation import gradient_sync, micro_batches
from checkpoints import load_resume
from common import backbone, cosine_lr, datasets, parse_args, setup, validate
from flags import Defaults
from torch import nn
from training import Recipe, fit

from momentum_contrast import KeyQueue, MomentumEncoder, info_nce, moco_v1_head, moco_v2_head
from momentum_contrast.augment import MoCoV1Augment, MoCoV2Augment
from momentum_contrast.distributed import batch_shuffle, batch_unshuffle
from momentum_contrast.norm import convert_split_batchnorm

# What differs between the two papers (everything else is shared).
PAPERS = {
    "v1": {"head": moco_v1_head, "temperature": 0.07, "augment": MoCoV1Augment, "cosine": False},
    "v2": {"head": moco_v2_head, "temperature": 0.2, "augment": MoCoV2Augment, "cosine": True},
}
PAPER_DEFAULTS = {
    "arch": "resnet50", "epochs": 200, "batch_size": 256, "lr": 0.03, "image_size": 224,
    "queue_size": 65536, "moco_momentum": 0.999, "dim": 128, "weight_decay": 1e-4,
    "schedule_milestones": "120,160", "shuffle_splits": 8, "knn_bank": 50000, "knn_queries": 10000,
    "shapes_train": 4000, "shapes_val": 1000, "crop_min": 0.2, "blur_p": 0.5, "accumulate": 1,
}  # fmt: skip
SHAPES_DEFAULTS = {
    "arch": "small_cnn", "epochs": 30, "batch_size": 64, "lr": 0.06, "image_size": 32,
    "queue_size": 1024, "moco_momentum": 0.99, "schedule_milestones": "20,25",
    "crop_min": 0.5, "blur_p": 0.0,  # 32-px images: gentler crops, no blur (as CIFAR recipes)
    "knn_bank": 4000, "knn_queries": 1000,
}  # fmt: skip
# The MoCo authors' CIFAR-10 demo: ResNet-18 with a CIFAR stem, batch 512, K 4,096, m 0.99,
# T 0.1, SGD lr 0.06 on a cosine schedule, weight decay 5e-4, 200 epochs, 8 BN splits, the
# v1 augmentation (no blur; crops of 8-100% of the image). STL-10: the same at 96 px.
CIFAR_DEFAULTS = {
    "arch": "resnet18", "epochs": 200, "batch_size": 512, "lr": 0.06, "image_size": 32,
    "queue_size": 4096, "moco_momentum": 0.99, "temperature": 0.1, "weight_decay": 5e-4,
    "crop_min": 0.08, "blur_p": 0.0, "knn_bank": 50000, "knn_queries": 10000,
}  # fmt: skip
STL_DEFAULTS = {**CIFAR_DEFAULTS, "image_size": 96, "knn_bank": 5000, "knn_queries": 8000}
LAYERS: Defaults = [
    (lambda a: a.data == "shapes", SHAPES_DEFAULTS),
    (lambda a: a.data in ("cifar10", "cifar100"), CIFAR_DEFAULTS),
    (lambda a: a.data == "stl10", STL_DEFAULTS),
    (lambda a: True, PAPER_DEFAULTS),
]


def build(args: argparse.Namespace, version: str, env: tuple[torch.device, int, int]) -> Recipe:
    """The MoCo v1 or v2 pieces for ``args`` and the training step that uses them."""
    paper = PAPERS[version]
    device, _, world = env
    features, feature_dim = backbone(args.arch, args.image_size)
    model = nn.Sequential(features, paper["head"](feature_dim, out_dim=args.dim)).to(device)
    if world > 1:  # the query encoder trains under DDP; the key encoder uses Shuffle-BN
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None
        )
    key_encoder = MomentumEncoder(model, momentum=args.moco_momentum)
    if world == 1 and args.shuffle_splits > 1:  # single process: emulate per-GPU BN
        convert_split_batchnorm(key_encoder.key_encoder, args.shuffle_splits)
    queue = KeyQueue(args.queue_size, args.dim).to(device)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay
    )
    blur = {"blur_p": args.blur_p} if version == "v2" else {}  # v1 has no blur
    augment = paper["augment"](args.image_size, scale=(args.crop_min, 1.0), **blur).to(device)
    milestones = [int(m) for m in args.schedule_milestones.split(",")]
    channels_last = device.type == "cuda"
    if channels_last:
        model.to(memory_format=torch.channels_last)
        key_encoder.to(memory_format=torch.channels_last)
    encode_q = torch.compile(model) if args.compile else model
    encode_k = torch.compile(key_encoder) if args.compile else key_encoder
    n = args.accumulate
    temperature = args.temperature or paper["temperature"]  # given, CIFAR's, or the paper's
    # Shuffle-BN's permutations come from a generator of their own, reseeded once per step
    # from the global one: the global stream (every later step's augmentations) is then
    # the same for any --accumulate N, though each micro-batch draws its own permutation.
    shuffle_rng = torch.Generator(device=device)

    def train_step(
        x_q: torch.Tensor, x_k: torch.Tensor, epoch: float
    ) -> dict[str, float | torch.Tensor]:
        if paper["cosine"]:
            lr = cosine_lr(args.lr, epoch, args.epochs)
        else:
            lr = args.lr * 0.1 ** sum(epoch >= m for m in milestones)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if channels_last:
            x_q, x_k = (x.contiguous(memory_format=torch.channels_last) for x in (x_q, x_k))
        key_encoder.update()  # m * key + (1 - m) * query, once, before computing the keys
        negatives = queue.negatives()  # one snapshot for every micro-batch of the step
        optimizer.zero_grad(set_to_none=True)
        total, window = torch.zeros((), device=device), []
        shuffle_rng.manual_seed(int(torch.randint(2**62, (1,))))  # one CPU draw per step
        for rows in micro_batches(len(x_q), n):
            with (
                gradient_sync(model, rows.stop == len(x_q)),
                torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"),
            ):
                q = encode_q(x_q[rows])  # (N / n, dim) queries
                shuffled, idx = batch_shuffle(x_k[rows], shuffle_rng)  # Shuffle-BN, per micro-batch
                k = batch_unshuffle(encode_k(shuffled), idx)  # (N / n, dim) keys, no grad
                loss = info_nce(q, k, negatives, temperature=temperature) / n
            loss.backward()  # gradients add up: the mean over the whole batch
            total += loss.detach()
            window.append(k)
        optimizer.step()
        queue.push(window[0] if n == 1 else torch.cat(window))  # all ranks' keys, in order
        return {"loss": total, "lr": lr, "momentum": args.moco_momentum}

    stateful = {"model": model, "key_encoder": key_encoder, "queue": queue, "optimizer": optimizer}
    return Recipe(stateful, train_step, augment, features)


def main(version: str = "v2") -> None:
    """Parse the flags, build the MoCo v1 or v2 pieces and train."""
    args = parse_args(f"MoCo {version} pre-training", LAYERS)
    validate(args, blur=version == "v2" and args.blur_p > 0)
    resume = load_resume(args, f"moco_{version}")  # checked before anything is built
    env = setup(args)
    recipe = build(args, version, env)
    fit(args, f"moco_{version}", *recipe, datasets(args), env, resume)


if __name__ == "__main__":
    main("v2")
