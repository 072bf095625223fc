"""Checkpoints of the pre-training scripts: what they hold, how they are read back.

A checkpoint holds the model, the key encoder, the queue and the optimizer, saved from
the *unwrapped* modules (no ``module.`` prefix), so it resumes under any number of
processes; a file written with the prefix (older scripts) loads too. It also holds every
rank's random generator states (``rng``: a list indexed by rank, see [`rng_states`][]),
the step, the kNN baseline and the arguments, which a resume checks against its own.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import os
import random
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from common import vit_heads
from flags import fail, flag
from torch import nn

REQUIRED = ("recipe", "step", "args", "model", "rng")
# Flags a checkpoint cannot be resumed without (the tensors' shapes depend on them) ...
MUST_MATCH = ("arch", "dim", "queue_size", "mlp_dim", "optimizer")
# ... and flags whose change makes the resumed run differ from the interrupted one.
WARN_IF_CHANGED = ("batch_size", "epochs", "seed", "lr", "image_size", "data", "augment_on")
WARN_IF_CHANGED += ("moco_momentum", "temperature", "weight_decay", "warmup_epochs")
WARN_IF_CHANGED += ("schedule_milestones", "crop_min", "blur_p", "shapes_train", "accumulate")


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write atomically: a killed run leaves the previous checkpoint, never a truncated one."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The checkpoint of the highest step in ``output_dir``, or None."""
    found = sorted(output_dir.glob("checkpoint_*.pt"))  # checkpoint_<7-digit step>.pt
    return found[-1] if found else None


def unwrap(obj: Any) -> Any:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` wrappers."""
    while isinstance(obj, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        obj = obj.module
    return obj


def strip_module_prefix(state: dict[str, Any]) -> dict[str, Any]:
    """A state dict without DDP's ``module.`` prefix (also after ``key_encoder.``)."""
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "key_encoder.module."):
            if key.startswith(prefix):
                key = prefix.removesuffix("module.") + key[len(prefix) :]
        out[key] = value
    return out


def state_of(stateful: dict[str, Any]) -> dict[str, Any]:
    """``{name: state_dict}`` of the unwrapped objects."""
    return {name: unwrap(obj).state_dict() for name, obj in stateful.items()}


def load_states(stateful: dict[str, Any], ckpt: dict[str, Any]) -> None:
    """Load a checkpoint saved with or without DDP into wrapped or unwrapped objects."""
    for name, obj in stateful.items():
        state = ckpt[name]
        if isinstance(unwrap(obj), nn.Module):
            state = strip_module_prefix(state)
        unwrap(obj).load_state_dict(state)


def seed_for(seed: int, rank: int, step: int) -> int:
    """The seed of ``rank``'s generators when it starts (step 0), or resumes at ``step``
    without a saved state of its own (see [`restore_rng`][])."""
    digest = hashlib.blake2b(f"{seed}/{rank}/{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def reseed(seed: int, rank: int, step: int) -> None:
    """Seed torch (CPU and CUDA) and Python's ``random`` from (seed, rank, step)."""
    torch.manual_seed(seed_for(seed, rank, step))
    random.seed(seed_for(seed, rank, step))


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's generator states: torch's CPU one, Python's ``random`` and, on a GPU,
    the CUDA generator of ``device``."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def rng_states(device: torch.device) -> list[dict[str, Any]]:
    """Every rank's [`rng_state`][], in rank order (a collective: call on every rank)."""
    mine = rng_state(device)
    if not dist.is_initialized():
        return [mine]
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return every


def restore_rng(saved: Any, args: argparse.Namespace, rank: int, world: int, step: int) -> None:
    """Restore this rank's generators from a checkpoint's ``rng`` entry.

    Rank ``r`` restores the state rank ``r`` saved, so a resume under the same number of
    processes continues exactly. A rank that saved nothing (more processes than before) is
    reseeded from ``(seed, rank, step)``; states of ranks that no longer exist (fewer
    processes) are dropped. Both cases print a warning: the run is deterministic, but not
    the one that would have continued under the old number of processes."""
    states = saved if isinstance(saved, list) else [saved]  # one dict: older checkpoints
    device = torch.device(args.device)
    if rank < len(states):
        state = states[rank]
        torch.set_rng_state(state["torch"].cpu())
        random.setstate(state["python"])
        if "cuda" in state and device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"].cpu(), device)
    else:
        reseed(args.seed, rank, step)
        print(
            f"warning: rank {rank} has no saved random state: reseeded from (seed, rank, step)",
            file=sys.stderr,
        )
    if rank == 0 and len(states) != world:
        print(
            f"warning: the checkpoint holds the random states of {len(states)} processes, "
            f"this run has {world}: the augmentations will differ from the original run's",
            file=sys.stderr,
        )


def load_resume(args: argparse.Namespace, recipe: str) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint to resume (``--resume``), read and checked against ``args``; None to
    start afresh. Stops with an error naming the flags that make it unusable, and warns
    (``warning:`` on stderr, rank 0) about changed flags that change the run."""
    if not args.resume:
        return None
    path = latest_checkpoint(Path(args.output_dir)) if args.resume == "auto" else Path(args.resume)
    if path is None:
        print(f"no checkpoint in {args.output_dir}: starting from scratch")
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any failure: not a checkpoint
        fail(f"--resume {path} is not a checkpoint ({type(e).__name__}: {e})")
    if not isinstance(ckpt, dict) or not all(k in ckpt for k in REQUIRED):
        fail(f"--resume {path} is not a checkpoint of these scripts (keys {', '.join(REQUIRED)})")
    if ckpt["recipe"] != recipe:
        fail(f"{path} is a {ckpt['recipe']} checkpoint, not {recipe}")
    saved, ours = ckpt["args"], vars(args)

    def changed(names: tuple[str, ...]) -> list[str]:
        return [
            f"{flag(n)} {ours[n]} (checkpoint: {saved[n]})"
            for n in names
            if n in saved and n in ours and saved[n] != ours[n]
        ]

    if differ := changed(MUST_MATCH + (("image_size",) if args.arch.startswith("vit") else ())):
        fail(f"--resume {path} was trained with other settings: {', '.join(differ)}")
    if (heads := vit_heads(args.arch)) is not None and ckpt.get("num_heads") != heads:
        saved = ckpt.get("num_heads")
        has = f"has {saved}" if saved else "does not record its (up to 0.2.0, vit_small: 6)"
        fail(f"--resume {path} {has} attention heads, --arch {args.arch} has {heads}")
    if (differ := changed(WARN_IF_CHANGED)) and int(os.environ.get("RANK", "0")) == 0:
        print(f"warning: resuming with changed {', '.join(differ)}", file=sys.stderr)
    return path, ckpt


def truncate_metrics(metrics: Path, step: int) -> None:
    """Drop the rows of ``metrics.csv`` after ``step`` (written after the last checkpoint by
    a run that then crashed), so a resumed run does not log those steps twice."""
    with open(metrics, newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames or [], [r for r in reader if int(r["step"]) <= step]
    tmp = metrics.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, metrics)


def debug_dump(stateful: dict[str, Any], rank: int, tag: str) -> None:
    """For the tests: with ``MOCO_EXAMPLES_DUMP_DIR`` set, every rank writes its own state
    dicts to ``rank<r>_<tag>.pt`` there (the checkpoint holds rank 0's only)."""
    folder = os.environ.get("MOCO_EXAMPLES_DUMP_DIR")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        torch.save(state_of(stateful), Path(folder) / f"rank{rank}_{tag}.pt")
