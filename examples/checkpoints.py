"""Checkpoints of moco_v2.py and moco_v3.py, and resuming from them: what one holds (the
unwrapped modules' states, so that it resumes under any number of processes; every rank's
random states; the step, the flags, the kNN baseline and a ViT's head count), when one is
written (``saves_at``), which files are the scripts' own (``checkpoints``: checkpoint_<step>.pt,
the newest --keep of them), which one a run resumes (``load_resume``; a folder that holds a
run is never written over without --resume) and the random streams that make a resumed run
the uninterrupted one (``rng_states``, ``restore_rng``). See docs/guides/checkpointing.md and
docs/guides/multi-node.md.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import re
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from harness import VITS, Env, fail
from monitoring import plot
from torch import nn


# ---- Every rank's random stream: saved by rank, restored by rank
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


# ---- The checkpoint's states: the unwrapped modules' (no DDP "module." prefix)
def state_of(pieces: dict[str, Any]) -> dict[str, Any]:
    return {name: getattr(obj, "module", obj).state_dict() for name, obj in pieces.items()}


def load_states(pieces: dict[str, Any], ckpt: dict[str, Any]) -> None:
    """Also a checkpoint of older scripts, with DDP's "module." prefix."""
    for name, obj in pieces.items():
        state, obj = ckpt[name], getattr(obj, "module", obj)
        if isinstance(obj, nn.Module):
            state = {re.sub(r"^(key_encoder\.)?module\.", r"\1", k): v for k, v in state.items()}
        obj.load_state_dict(state)


CHECKPOINT = re.compile(r"checkpoint_(\d{7})\.pt")  # the scripts' own: checkpoint_<step>.pt


def checkpoints(out: Path) -> list[Path]:
    """The scripts' own checkpoints in ``out``, oldest first (a user's checkpoint_best.pt is
    none of them: never resumed from, never deleted)."""
    found = [p for p in out.glob("checkpoint_*.pt") if CHECKPOINT.fullmatch(p.name)]
    return sorted(found, key=lambda p: p.name)


def saves_at(args: argparse.Namespace, step: int, steps_per_epoch: int, last: int) -> bool:
    """Whether a checkpoint follows ``step``: an epoch's end, the stop, every --save-every."""
    every = args.save_every and step % args.save_every == 0
    return step % steps_per_epoch == 0 or step == last or bool(every)


def save_checkpoint(out: Path, state: dict[str, Any], meta: dict[str, Any], step: int,
                    env: Env, keep: int) -> None:  # fmt: skip
    """The pieces' ``state`` and the run's ``meta`` at ``step``, with every rank's random
    states (a collective: every rank calls it). Rank 0 writes checkpoint_<step>.pt, then
    renames it (a killed run leaves the previous ones whole), and deletes all but the newest
    ``keep`` (--keep): if the newest cannot be read, --resume auto takes the one before. It
    redraws metrics.png."""
    device, rank, world = env
    rng = rng_states(device, world)
    debug_dump(state, rank, f"{step:07d}")
    if rank == 0:
        plot(out)
        torch.save({**state, **meta, "step": step, "rng": rng}, out / "checkpoint.tmp")
        os.replace(out / "checkpoint.tmp", out / f"checkpoint_{step:07d}.pt")
        for old in checkpoints(out)[:-keep]:
            old.unlink()


def resume_states(
    resume: tuple[Path, dict[str, Any]] | None, pieces: dict[str, Any], env: Env, *,
    load: Any = load_states, states: Any = state_of,
) -> tuple[int, Any, Any]:  # fmt: skip
    """The step, kNN baseline and every rank's random states of ``resume`` (load_resume's),
    its states loaded into ``pieces`` (``load``; ``states`` reads them back for the tests'
    dump); a new run's: (0, None, [])."""
    step, baseline, rng = 0, None, []
    if resume is not None:
        path, ckpt = resume
        load(pieces, ckpt)
        step, baseline, rng = ckpt["step"], ckpt["knn_baseline"], ckpt["rng"]
        print(f"resumed from {path} at step {step}")
        debug_dump(states(pieces), env[1], "loaded")
    steps = [step] * env[2]
    if env[2] > 1:  # every rank read the same checkpoint (a shared --output-dir)
        dist.all_gather_object(steps, step)
    if len(set(steps)) > 1:
        fail(f"the processes resumed at different steps {steps}: every node must see the "
             "same --output-dir (a shared file system)")  # fmt: skip
    return step, baseline, rng


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
    found = checkpoints(Path(args.output_dir))
    if not args.resume:
        if found:  # a new run here would overwrite that one's checkpoints and metrics
            fail(f"--output-dir {args.output_dir} holds a run ({found[-1].name}): continue "
                 "it with --resume auto, or start a new one with another --output-dir")  # fmt: skip
        return None
    candidates = [Path(args.resume)] if args.resume != "auto" else found[::-1]
    if not candidates:
        print(f"no checkpoint in {args.output_dir}: starting from scratch")
        return None
    for path in candidates:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            break
        except Exception as e:  # no such file, not a PyTorch file, cut short
            problem = f"{path} is not a checkpoint ({type(e).__name__}: {e})"
            if args.resume != "auto" or path == candidates[-1]:
                fail(f"--resume {problem}")
            print(f"warning: {problem}; taking the one before", file=sys.stderr)
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
