"""MoCo v3 pre-training (ResNet or ViT), built from momentum_contrast's pieces.

    python examples/moco_v3.py                                   # built-in shapes, CPU or GPU
    python examples/moco_v3.py --arch vit_tiny                   # a small ViT on shapes
    python examples/moco_v3.py --data cifar10 --data-root data   # CIFAR-10 (downloaded there)
    torchrun --nproc-per-node 8 examples/moco_v3.py --data /data/imagenet --arch vit_small
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --nnodes 8 --nproc-per-node 8 \\
        --rdzv-backend c10d --rdzv-endpoint HOST:29500 --rdzv-id RUN --max-restarts 3 \\
        examples/moco_v3.py --data /data/imagenet --arch vit_base --fsdp --accumulate 2 \\
        --output-dir /shared/runs/v3 --resume auto --save-every 1000    # on every node

Paper defaults (ImageNet): ResNet-50 with LARS, lr 0.6 x batch/256, weight decay 1e-6, T 1.0,
10 warm-up epochs, 100 epochs, crops of 20-100%; ViTs with AdamW, lr 1.5e-4 x batch/256,
weight decay 0.1, T 0.2, 40 warm-up epochs, 300 epochs, crops of 8-100%, a frozen random patch
projection and sin-cos position embeddings. Both: the authors' initialisation
(``reference_init``; timm's ViTs keep timm's), batch 4096, two symmetric views, keys from all
GPUs as negatives, momentum 0.99 -> 1 on a cosine, a projector (2 layers for ResNets, 3 for
ViTs) and a predictor, SyncBatchNorm across GPUs. ``--accumulate N``: N micro-batches per
process, each scored against the keys of the whole batch. ``--fsdp``: both encoders sharded
with FSDP2 per ViT block; checkpoints in the replicated run's form (they move between
``--fsdp`` and DDP).

Read top to bottom, as moco_v2.py: flags, the MoCo v3 pieces and their step (``build``),
the checkpoints of ``--fsdp``, the loop (``main``). What a run needs besides MoCo (set-up,
random states, backbones, step log, kNN monitor, checkpoints) is in harness.py,
monitoring.py and checkpoints.py, the data in data.py. A checkpoint resumes exactly in as
many processes, and continues in any other number (with other per-process batches).
Several nodes, restarts after a lost process, Slurm (multi_node.sbatch):
docs/guides/multi-node.md. Tested on the CPU with gloo (torch 2.14.1):
1 and 2 processes, 2 torchrun agents on one machine, a process killed and restarted by
torchrun; not tested here: NCCL, real nodes.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import re
from pathlib import Path
from typing import Any

import torch
from checkpoints import (
    claim,
    load_resume,
    load_states,
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
    fraction,
    is_vit,
    leave,
    load_data,
    non_negative_float,
    non_negative_int,
    parse_flags,
    pixels,
    positive_float,
    positive_int,
    run_flags,
    run_steps,
    setup,
    training_views,
)
from monitoring import (
    KnnMonitor,
    StepLog,
    report,
)
from torch import nn

from momentum_contrast import MomentumEncoder, cosine_momentum, symmetric_contrastive_loss
from momentum_contrast.augment import MoCoV3Augment
from momentum_contrast.heads import moco_v3_predictor, moco_v3_projector
from momentum_contrast.optim import LARS
from momentum_contrast.vit import freeze_patch_embedding, use_sincos_position_embedding

# ---- Flags: the paper's defaults (in the parser; ViTs: VIT), replaced by a data set's recipe
# (DATA; ViTs on shapes: SHAPES_VIT), replaced by the command line. argparse checks each flag;
# ``validate`` those that must fit together.
VIT = {"epochs": 300, "lr": 1.5e-4, "optimizer": "adamw", "weight_decay": 0.1,
       "temperature": 0.2, "warmup_epochs": 40}  # fmt: skip
SHAPES = {"arch": "small_cnn", "epochs": 30, "batch_size": 64, "image_size": 32,
          "temperature": 0.2, "warmup_epochs": 1, "mlp_dim": 1024, "knn_bank": 4000,
          "knn_queries": 1000}  # fmt: skip
SHAPES_VIT = {"lr": 5e-4, "warmup_epochs": 1}
# CIFAR-10/100, STL-10 (no MoCo v3 recipe exists for them): a ResNet-18 (the CIFAR stem at
# 32 px), batch 512, 200 epochs; the rest as the paper's ResNet recipe.
CIFAR = {"arch": "resnet18", "epochs": 200, "batch_size": 512, "image_size": 32}
STL = {**CIFAR, "image_size": 96, "knn_bank": 5000, "knn_queries": 8000}
DATA = {"shapes": SHAPES, "cifar10": CIFAR, "cifar100": CIFAR, "stl10": STL}


def build_parser() -> argparse.ArgumentParser:
    """MoCo v3's flags, then the run's (harness.run_flags: --data, --arch, --output-dir, ...)."""
    p = OneLineParser(description="MoCo v3 pre-training")
    arg = p.add_argument
    arg("--epochs", type=positive_int, default=100, help="number of training epochs")
    arg("--batch-size", type=positive_int, default=4096, help="total over all processes")
    arg("--lr", type=positive_float, default=0.6, help="base learning rate, times batch/256")
    arg("--image-size", type=pixels, default=224, help="side of the square views, in pixels")
    arg("--optimizer", choices=("lars", "adamw"), default="lars", help="LARS, or AdamW (ViTs)")
    arg("--weight-decay", type=non_negative_float, default=1e-6, help="of the optimizer")
    arg("--temperature", type=positive_float, default=1.0, help="T of the contrastive loss")
    arg("--warmup-epochs", type=non_negative_int, default=10, help="linear learning-rate warm-up")
    arg("--moco-momentum", type=fraction, default=0.99, help="the key encoder's (cosine to 1)")
    arg("--dim", type=positive_int, default=256, help="output size of projector and predictor")
    arg("--mlp-dim", type=positive_int, default=4096, help="hidden size of projector, predictor")
    arg("--accumulate", type=positive_int, default=1, help="micro-batches per process and step")
    arg("--fsdp", action="store_true", help="ViTs: shard both encoders with FSDP2 (not DDP)")
    return run_flags(p)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    data = DATA.get(parser.parse_known_args(argv)[0].data, {})
    parser.set_defaults(**data)  # its --arch decides the recipe
    known = parser.parse_known_args(argv)[0]
    if is_vit(known.arch):  # ViT: the paper's ViT recipe, under the data's (ViTs on shapes)
        parser.set_defaults(**{**VIT, **data, **(SHAPES_VIT if known.data == "shapes" else {})})
    return parse_flags(parser, argv)


def validate(args: argparse.Namespace) -> None:
    """The flags that must fit together (argparse checked each alone), and the processes:
    harness.check_flags, with --fsdp's need of a torchvision ViT; v3 always blurs."""
    sharded = f"--fsdp shards transformer blocks: --arch {args.arch} is not a torchvision ViT"
    fsdp = (args.fsdp and not args.arch.startswith("vit"), f"{sharded} (use a vit_*)")
    check_flags(args, fsdp, blur=True)


# ---- MoCo v3: a backbone, projector and predictor, the key encoder and the step
def build(args: argparse.Namespace, env: Env) -> Any:
    """(pieces, train_step, augment, features) of MoCo v3; ``features``: the backbone for the
    kNN monitor (under --fsdp, rank 0's unsharded replica)."""
    device, rank, world = env
    vit = is_vit(args.arch)
    features, feature_dim = checked_backbone(args.arch, args.image_size)
    reference_init(features)
    if vit:  # the v3 ViT recipe: fixed random patch projection, fixed sin-cos positions
        freeze_patch_embedding(features)
        use_sincos_position_embedding(features)
    mlp = {"hidden_dim": args.mlp_dim}
    projector = moco_v3_projector(feature_dim, **mlp, out_dim=args.dim, num_layers=3 if vit else 2)
    base = nn.Sequential(features, projector).to(device)  # what the momentum encoder follows
    predictor = moco_v3_predictor(args.dim, **mlp, last_bn=vit).to(device)
    if world > 1 and device.type == "cuda":  # BatchNorm statistics over all GPUs
        base = nn.SyncBatchNorm.convert_sync_batchnorm(base)
        predictor = nn.SyncBatchNorm.convert_sync_batchnorm(predictor)
    elif world > 1 and rank == 0:  # DDP refuses SyncBatchNorm on CPU modules
        print("warning: SyncBatchNorm needs CUDA: on the CPU each process normalises its own batch")
    key_encoder = MomentumEncoder(base, momentum=args.moco_momentum)  # before any sharding
    model: Any = nn.Sequential(base, predictor)  # the query encoder
    monitor = copy.deepcopy(features) if args.fsdp and rank == 0 else features
    if args.fsdp:  # FSDP2: each ViT block of both encoders its own unit, then each root
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        from torchvision.models.vision_transformer import EncoderBlock

        bf16: dict[str, Any] = {"param_dtype": torch.bfloat16, "reduce_dtype": torch.float32}
        policy = MixedPrecisionPolicy(**(bf16 if device.type == "cuda" else {}))
        shard: dict[str, Any] = {
            "mesh": init_device_mesh(device.type, (world,)),
            "mp_policy": policy,
        }
        for root in (model, key_encoder.key_encoder):
            for block in [m for m in root.modules() if isinstance(m, EncoderBlock)]:
                fully_shard(block, **shard)
            fully_shard(root, **shard)
    elif world > 1:
        ids = [device] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    lr = args.lr * args.batch_size / 256  # the linear scaling rule
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "lars":
        optimizer: Any = LARS(params, lr=lr, weight_decay=args.weight_decay, momentum=0.9)
    else:
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=args.weight_decay)
    encode_q = torch.compile(model) if args.compile else model
    encode_k = torch.compile(key_encoder) if args.compile else key_encoder
    n, warmup = args.accumulate, args.warmup_epochs

    def sync_gradients(last: bool) -> Any:  # reduce the gradients across ranks at the last
        if args.fsdp:
            model.set_requires_gradient_sync(last)
        elif world > 1 and not last:
            return model.no_sync()
        return contextlib.nullcontext()

    def train_step(x1: torch.Tensor, x2: torch.Tensor, epoch: float) -> dict[str, Any]:
        cosine = 0.5 * (1 + math.cos(math.pi * (epoch - warmup) / max(args.epochs - warmup, 1e-8)))
        step_lr = lr * epoch / warmup if epoch < warmup else lr * cosine  # warm-up, then cosine
        for group in optimizer.param_groups:
            group["lr"] = step_lr
        m = cosine_momentum(epoch, args.epochs, base=args.moco_momentum)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
        key_encoder.update(m)  # once per step, before computing the keys
        with autocast:  # the keys of the whole local batch first: (N, dim), no grad
            k1, k2 = encode_k(x1), encode_k(x2)
        optimizer.zero_grad(set_to_none=True)
        total, size = torch.zeros((), device=device), len(x1) // n
        for start in range(0, len(x1), size):  # each micro-batch against all ranks' keys
            with sync_gradients(start + size == len(x1)), autocast:
                q1, q2 = encode_q(x1[start : start + size]), encode_q(x2[start : start + size])
                loss = symmetric_contrastive_loss(
                    q1, q2, k1, k2, temperature=args.temperature, positive_offset=start
                )  # (N / n, dim) queries against (N, dim) keys
            (loss / n).backward()  # gradients add up: the whole batch's
            total += loss.detach() / n
        optimizer.step()
        return {"loss": total, "lr": step_lr, "momentum": m}

    pieces = {"model": model, "key_encoder": key_encoder, "optimizer": optimizer}
    scale = (0.08, 1.0) if vit else (0.2, 1.0)  # the authors' --crop-min for ViTs, ResNets
    return pieces, train_step, MoCoV3Augment(args.image_size, scale=scale).to(device), monitor


def reference_init(features: nn.Module) -> None:
    """The authors' initialisation where torchvision's differs: in a ResNet, the last
    BatchNorm of each residual block starts at zero (``zero_init_residual=True``); in a
    torchvision ViT (not timm's), linear layers are Xavier-uniform with zero biases, q, k and v
    each Xavier-uniform on its own, and the class token is drawn from N(0, 1e-6)."""
    from torchvision.models.resnet import BasicBlock, Bottleneck
    from torchvision.models.vision_transformer import VisionTransformer

    with torch.no_grad():
        for m in features.modules():
            if isinstance(m, (BasicBlock, Bottleneck)):
                (m.bn3 if isinstance(m, Bottleneck) else m.bn2).weight.zero_()
        if not isinstance(features, VisionTransformer):
            return
        for m in features.modules():
            if isinstance(m, nn.MultiheadAttention):  # in_proj_weight (3D, D): q, k, v
                for weight in m.in_proj_weight.chunk(3):
                    nn.init.xavier_uniform_(weight)
                nn.init.zeros_(m.in_proj_bias)
            elif isinstance(m, nn.Linear):  # the attention's out_proj and the MLPs
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(features.class_token, std=1e-6)


# ---- Checkpoints under --fsdp: as a replicated run's (harness.state_of), so that they move
# between --fsdp and DDP: full tensors, the optimizer's state keyed by position.
def fsdp_state_of(pieces: dict[str, Any]) -> dict[str, Any]:
    """The full states, on rank 0's CPU (a collective)."""
    from torch.distributed.checkpoint import state_dict as dcp

    model, key_encoder, optimizer = pieces.values()
    full = dcp.StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = {"model": dcp.get_model_state_dict(model, options=full),
             "key_encoder": dcp.get_model_state_dict(key_encoder, options=full)}  # fmt: skip
    by_name = dcp.get_optimizer_state_dict(model, optimizer, options=full)  # {} off rank 0
    at = {name: i for i, name in enumerate(parameter_names(model, optimizer))}
    return {**state, "optimizer": rekey(by_name, at) if by_name else {}}


def load_fsdp_states(pieces: dict[str, Any], ckpt: dict[str, Any]) -> None:
    """Every rank read the checkpoint (also an older one, with DDP's "module." prefix): each
    keeps its shards."""
    from torch.distributed.checkpoint import state_dict as dcp

    model, key_encoder, optimizer = pieces.values()
    full = dcp.StateDictOptions(full_state_dict=True)
    for name, module in (("model", model), ("key_encoder", key_encoder)):
        state = {re.sub(r"^(key_encoder\.)?module\.", r"\1", k): v for k, v in ckpt[name].items()}
        dcp.set_model_state_dict(module, state, options=full)
    names = dict(enumerate(parameter_names(model, optimizer)))
    dcp.set_optimizer_state_dict(model, optimizer, rekey(ckpt["optimizer"], names), options=full)


def parameter_names(model: nn.Module, optimizer: Any) -> list[str]:
    """The optimizer's parameters' names, in its order (FSDP keys their state by name)."""
    name_of = {id(p): name for name, p in model.named_parameters()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


def rekey(optimizer_state: dict[str, Any], key: dict[Any, Any]) -> dict[str, Any]:
    """An optimizer state dict with each parameter's key replaced: ``key[old]``."""
    state, groups = optimizer_state["state"], optimizer_state["param_groups"]
    groups = [{**group, "params": [key[p] for p in group["params"]]} for group in groups]
    return {"state": {key[k]: v for k, v in state.items()}, "param_groups": groups}


# ---- Resuming (harness.load_resume): the flags a checkpoint's must equal, and those whose
# change is a warning
MUST_MATCH = ("arch", "dim", "mlp_dim", "optimizer")  # the tensors' shapes
WARN_IF_CHANGED = ("batch_size", "epochs", "seed", "lr", "image_size", "data", "augment_on",
                   "moco_momentum", "temperature", "weight_decay", "warmup_epochs",
                   "shapes_train", "shapes_val", "knn_bank", "knn_queries",
                   "accumulate")  # fmt: skip


# ---- The loop: epochs of steps; at each epoch's end the kNN monitor and a checkpoint
def main() -> None:
    args = parse_args()
    validate(args)
    recipe, out = "moco_v3", Path(args.output_dir)
    lock = claim(args.output_dir)  # held to the end: no second run writes there meanwhile
    resume = load_resume(args, recipe, MUST_MATCH, WARN_IF_CHANGED)  # before anything is built
    _, rank, world = env = setup(args, alone=args.fsdp)  # --fsdp alone: a group of one
    pieces, train_step, augment, features = build(args, env)
    states, load = (fsdp_state_of, load_fsdp_states) if args.fsdp else (state_of, load_states)
    train, val, classes = load_data(args)
    steps_per_epoch, last = run_steps(args, len(train))
    step, baseline, saved_rng = resume_states(resume, pieces, env, steps_per_epoch, out,
                                               load=load, states=states)  # fmt: skip

    def gather() -> None:  # --fsdp: a sharded backbone cannot run alone: to rank 0's copy
        from torch.distributed.checkpoint import state_dict as dcp

        full = dcp.StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = dcp.get_model_state_dict(pieces["model"], options=full)  # {} off rank 0
        backbone_state = {k[4:]: v for k, v in state.items() if k.startswith("0.0.")}
        if rank == 0:
            features.load_state_dict(backbone_state)

    knn = KnnMonitor(
        features, (train, val, classes), args, env, gather=gather if args.fsdp else None
    )
    if baseline is None:
        baseline = knn(step, "kNN top-1 at random initialisation: {value:.1f}%")
    log = StepLog(out / "metrics.csv" if rank == 0 else None, args.log_every, args.batch_size,
                  keep=rows_to_keep(resume, out))  # fmt: skip
    restore_rng(saved_rng, args.seed, rank, world, step)  # from here each rank its own stream
    meta = {"recipe": recipe, "args": vars(args), "knn_baseline": baseline,
            "num_heads": attention_heads(args.arch, features),
            "steps_per_epoch": steps_per_epoch}  # fmt: skip
    for x1, x2 in training_views(args, train, augment, log, env, step=step, last=last):
        stats = train_step(x1, x2, step / steps_per_epoch)  # the epoch, a float
        step, epoch = step + 1, step // steps_per_epoch
        if log.add(step, epoch, stats["loss"], stats["lr"], stats["momentum"]):
            log.flush()  # one read of the last --log-every losses
        if saves_at(args, step, steps_per_epoch, last):  # an epoch's end, the stop, --save-every
            log.flush()  # its last steps, before the kNN monitor and the checkpoint
            if step % steps_per_epoch == 0:
                value = knn(step, "epoch {epoch}: kNN top-1 {value:.1f}%", epoch=epoch + 1)
                log.write({"step": step, "epoch": epoch, "knn_top1": round(value, 2)})
            save_checkpoint(out, states(pieces), meta, step, env, args.keep)  # collectives: --fsdp
    report(step, knn.final(step), baseline, out, env)  # the kNN of the weights at the stop
    if lock is not None:
        lock.close()


if __name__ == "__main__":
    main()
    leave()  # after main: its models let go of the process group
