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
import contextlib
import errno
import fcntl
import functools
import hashlib
import os
import random
import re
import socket
import sys
import weakref
import zipfile
from pathlib import Path
from typing import IO, Any

import torch
import torch.distributed as dist
from harness import BUILT_IN, VITS, Env, fail
from monitoring import plot
from torch import nn
from torch.utils._pytree import tree_leaves


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
              f"this run has {world}: the augmentations and the batch statistics (BatchNorm, "
              "Shuffle-BN) will differ", file=sys.stderr)  # fmt: skip


def reason(e: BaseException) -> str:
    """Why, in one line: torch.load's refusal of a file that is no weights-only checkpoint
    takes many lines (some coloured), of which the unpickler's own is kept."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    if cause := re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text):
        what = cause[1].split(" was not an allowed global")[0]  # the class a pickle names
        return f"{type(e).__name__}: no weights-only checkpoint: {what}"
    lines = text.strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def damaged_record(path: Path) -> str | None:
    """What is wrong with a checkpoint's records (a zip), which torch.load does not check, or
    None: the first record whose data fails its CRC-32 (records saved without one,
    ``torch.serialization.set_crc32_options(False)``, write 0 and are not checked), or one
    holding data but marked as a folder, a bit of its header that no CRC-32 covers (torch
    then reads memory that was never written for it, and loads leftover values as the
    weights)."""
    with zipfile.ZipFile(path) as archive:
        for record in archive.infolist():
            # MS-DOS's folder bit on a record with data (a re-zipped file's folders hold none)
            if (record.is_dir() or record.external_attr & 0x10) and record.file_size:
                return f"its record {record.filename} is marked as a folder (a changed header)"
            if record.CRC == 0:  # none written (or an empty record: nothing to check)
                continue
            try:
                with archive.open(record) as data:  # the check runs at the end of the data
                    while data.read(1 << 24):
                        pass
            except zipfile.BadZipFile:
                return f"its record {record.filename} fails its CRC-32 check"
    return None


def fingerprint(path: Path) -> str:
    """What tells two checkpoints of one name apart, from the zip's directory alone: each
    record's name, size and CRC-32 (another run's checkpoint_<step>.pt in a folder local to
    each node has the same name, other contents)."""
    with zipfile.ZipFile(path) as archive:
        records = [(r.filename, r.file_size, r.CRC) for r in archive.infolist()]
    return hashlib.blake2b(repr(records).encode(), digest_size=8).hexdigest()


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


CHECKPOINT = re.compile(r"checkpoint_([0-9]{7,})\.pt")  # the scripts' own: checkpoint_<step>.pt


def step_of(path: Path) -> int:
    match = CHECKPOINT.fullmatch(path.name)
    return int(match[1]) if match else -1


def checkpoints(out: Path) -> list[Path]:
    """The scripts' own checkpoints in ``out``, oldest first (a user's checkpoint_best.pt is
    none of them: never resumed from, never deleted)."""
    return sorted((p for p in out.glob("checkpoint_*.pt") if step_of(p) >= 0), key=step_of)


def claim(output_dir: str) -> IO[str] | None:
    """On rank 0: make --output-dir and hold an exclusive lock on its .lock file while the
    returned file is kept (closed or collected, it lets go; the kernel lets go when the
    process ends, killed too), so that a second run started into the same folder, before or
    after the first one's first checkpoint, stops instead of writing between its files. The
    processes it forks (loader workers) close their copy at once: they outlive a killed run
    by seconds, and holding the lock on they would refuse the run restarted into the folder.
    On a file system without locks the run warns and goes on."""
    if os.environ.get("RANK", "0") != "0":
        return None
    out = Path(output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = open(out / ".lock", "a+")  # noqa: SIM115 (held open: the lock lives with it)
    except OSError as e:
        fail(f"--output-dir {output_dir}: cannot write there ({type(e).__name__}: {e})")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.register_at_fork(after_in_child=functools.partial(_let_go, weakref.ref(lock)))
    except BlockingIOError:
        with lock:
            lock.seek(0)
            holder = lock.read().strip()
        fail(f"--output-dir {output_dir} is in use by another run ({holder}): wait for it to "
             "end, or use another --output-dir")  # fmt: skip
    except OSError as e:  # ENOLCK, ENOSYS: a file system that refuses flock
        print(f"warning: --output-dir {output_dir} cannot be locked ({e.strerror}): nothing "
              "stops a second run started into it", file=sys.stderr)  # fmt: skip
    lock.seek(0)
    lock.truncate()
    lock.write(f"process {os.getpid()} on {socket.gethostname()}\n")
    lock.flush()
    return lock


def _let_go(held: weakref.ref[IO[str]]) -> None:
    """In a forked process: close the run's lock file, held weakly (a run's that ended goes)."""
    if (lock := held()) is not None:
        lock.close()


def saves_at(args: argparse.Namespace, step: int, steps_per_epoch: int, last: int) -> bool:
    """Whether a checkpoint follows ``step``: an epoch's end, the stop, every --save-every."""
    every = args.save_every and step % args.save_every == 0
    return step % steps_per_epoch == 0 or step == last or bool(every)


FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # no space, over quota, over a file-size limit


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
        tensors = [t for t in tree_leaves(state) if isinstance(t, torch.Tensor)]
        if not all(bool(t.isfinite().all()) for t in tensors if t.is_floating_point()):
            fail(f"the weights of step {step} hold NaN or infinite values: training diverged "
                 "(a smaller --lr?); not saved, the checkpoints before it are kept")  # fmt: skip
        plot(out)
        try:  # through a file of Python's, whose writes raise (a path of torch's may end a
            with open(out / "checkpoint.tmp", "wb") as f:  # file short and say nothing)
                torch.save({**state, **meta, "step": step, "rng": rng}, f)
                f.flush()
                os.fsync(f.fileno())  # on the disk before it takes the name
        except (OSError, RuntimeError) as e:
            # torch's "unexpected pos" follows the write that failed, which says why
            cause = e.__context__ if "unexpected pos" in str(e) and e.__context__ else e
            with contextlib.suppress(OSError):  # the space it took, given back
                (out / "checkpoint.tmp").unlink(missing_ok=True)
            short = getattr(cause, "errno", None) in FULL or (
                cause is e and "unexpected pos" in str(e)
            )
            if not short:
                raise cause from None  # not a short write (a bug, an I/O error, Ctrl-C)
            fail(f"cannot write the checkpoint of step {step} into {out} (is the disk full?): "
                 f"{reason(cause)}")  # fmt: skip
        os.replace(out / "checkpoint.tmp", out / f"checkpoint_{step:07d}.pt")
        for old in checkpoints(out)[:-keep]:  # none is newer than this one (load_resume)
            old.unlink()


def resume_states(
    resume: tuple[Path, dict[str, Any]] | None, pieces: dict[str, Any], env: Env,
    steps_per_epoch: int, out: Path, *, load: Any = load_states, states: Any = state_of,
) -> tuple[int, Any, Any]:  # fmt: skip
    """The step, kNN baseline and every rank's random states of ``resume`` (load_resume's),
    its states loaded into ``pieces`` (``load``; ``states`` reads them back for the tests'
    dump); a new run's: (0, None, []). Epochs of another length (another --batch-size,
    --data or --shapes-train, or images added) are counted in this run's steps, from a
    checkpoint of an epoch's end, into another --output-dir than its own (``out``): the
    checkpoints there are numbered in steps of its epochs."""
    mine: tuple[Any, ...] = (0, "") if resume is None else (resume[1]["step"], resume[0].name)
    every = [mine] * env[2]
    if env[2] > 1:  # every rank read the same checkpoint (a shared --output-dir), checked
        try:  # before the weights are loaded (a collective under --fsdp): the same file
            mine += (fingerprint(resume[0]),) if resume else ()
        except (OSError, zipfile.BadZipFile) as e:  # gone or rewritten since it was read:
            mine += (f"unreadable now ({e})",)  # every rank still meets in the collective
        dist.all_gather_object(every, mine)
    if len(set(every)) > 1:
        fail(f"the processes would resume from different checkpoints {every}: every node "
             "must see the same --output-dir (a shared file system)")  # fmt: skip
    if resume is None:
        return 0, None, []
    path, ckpt = resume
    step, saved_epoch = ckpt["step"], ckpt.get("steps_per_epoch", steps_per_epoch)  # 0.3.0: none
    if saved_epoch != steps_per_epoch:  # its step would be read in this run's epochs
        if path.resolve().parent == out.resolve():
            fail(f"--resume {path}: its epochs had {saved_epoch} steps, this run's have "
                 f"{steps_per_epoch} (--batch-size, --data or --shapes-train changed, or the "
                 "images), and its folder's checkpoints count steps: resume it into another "
                 "--output-dir")  # fmt: skip
        if step % saved_epoch:
            fail(f"--resume {path}: step {step} is within an epoch of {saved_epoch} steps, this "
                 f"run's have {steps_per_epoch} (--batch-size, --data or --shapes-train "
                 "changed): resume it with the flags that wrote it, or resume a checkpoint "
                 "of an epoch's end")  # fmt: skip
        step = step // saved_epoch * steps_per_epoch
        if env[1] == 0:
            print(f"warning: the checkpoint's epochs had {saved_epoch} steps, this run's have "
                  f"{steps_per_epoch}: it resumes at step {step}", file=sys.stderr)  # fmt: skip
    load(pieces, ckpt)
    print(f"resumed from {path} at step {step}")
    debug_dump(states(pieces), env[1], "loaded")
    return step, ckpt["knn_baseline"], ckpt["rng"]


def rows_to_keep(resume: tuple[Path, dict[str, Any]] | None, out: Path) -> int:
    """The rows of out/metrics.csv that a run keeps: those up to the step it resumes from a
    checkpoint of ``out``; none when it resumes another folder's checkpoint (rows there are
    another attempt's) or starts anew."""
    if resume is None or resume[0].resolve().parent != out.resolve():
        return 0
    step: int = resume[1]["step"]
    return step


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
                 "it with --resume auto (the script and flags that wrote it), or start a new "
                 "one with another --output-dir")  # fmt: skip
        return None
    candidates = [Path(args.resume)] if args.resume != "auto" else found[::-1]
    here = [p.resolve() for p in found]
    if args.resume != "auto" and found and Path(args.resume).resolve() not in here:
        # another run's: its checkpoints and metrics would mix with this one's
        fail(f"--output-dir {args.output_dir} holds another run ({found[-1].name}): resume "
             f"{args.resume} into another --output-dir, or continue that run with "
             "--resume auto")  # fmt: skip
    if not candidates:
        print(f"no checkpoint in {args.output_dir}: starting from scratch")
        return None
    skipped = []
    for path in candidates:
        try:
            if (damaged := damaged_record(path)) is not None:
                raise ValueError(damaged)
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            break
        except Exception as e:  # no such file, not a PyTorch file, cut short, damaged
            problem = f"{path} is not a checkpoint ({reason(e)})"
            if args.resume != "auto" or path == candidates[-1]:
                fail(f"--resume {problem}")
            print(f"warning: {problem}; taking the one before (it becomes "
                  f"{path.name}.unreadable)", file=sys.stderr)  # fmt: skip
            skipped.append(path)
            if os.environ.get("RANK", "0") == "0":  # out of the way of resume and clean-up
                with contextlib.suppress(OSError):  # another node's rank may be reading it
                    path.rename(path.with_name(path.name + ".unreadable"))
    step = ckpt.get("step") if isinstance(ckpt, dict) else None
    newer = [p for p in found if p not in skipped and step_of(p) > (step or 0)]
    if isinstance(step, int) and newer:
        # a run resumed here would write between them, and --resume auto take them again
        fail(f"--output-dir {args.output_dir} holds checkpoints newer than step {step} of "
             f"{path.name} (up to {newer[-1].name}): resume the newest with --resume auto, "
             "or resume this one into another --output-dir")  # fmt: skip
    keys = ("recipe", "step", "args", "model", "rng")
    if not isinstance(ckpt, dict) or not all(k in ckpt for k in keys):
        fail(f"--resume {path} is not a checkpoint of these scripts (keys {', '.join(keys)})")
    if ckpt["recipe"] != recipe:
        fail(f"{path} is a {ckpt['recipe']} checkpoint, not {recipe}")
    saved, ours = ckpt["args"], vars(args)

    def changed(*names: str) -> str:  # None: not recorded (--temperature up to 0.3.0), or
        known = [n for n in names if saved.get(n) is not None and ours[n] is not None]  # unused
        differ = [n for n in known if saved[n] != ours[n]]
        flags = (f"--{n.replace('_', '-')} {ours[n]} (checkpoint: {saved[n]})" for n in differ)
        return ", ".join(flags)

    # a torchvision ViT's weights depend on the image size; a ResNet's on whether it is at
    # most 32 px, where harness.backbone gives it the CIFAR stem
    was_small = (saved.get("image_size") or args.image_size) <= 32
    stem = args.arch.startswith("resnet") and was_small != (args.image_size <= 32)
    if differ := changed(*must_match, *["image_size"] * (args.arch.startswith("vit") or stem)):
        fail(f"--resume {path} was trained with other settings: {differ}")
    if (heads := VITS.get(args.arch, (0, None))[1]) and ckpt.get("num_heads") != heads:
        has = f"has {ckpt['num_heads']}" if ckpt.get("num_heads") else "does not record its"
        fail(f"--resume {path} {has} attention heads, --arch {args.arch} has {heads}")

    def where(data: str) -> str:  # a built-in data set, or a folder however spelled
        return data if data in BUILT_IN else str(Path(data).resolve())

    if "steps_per_epoch" not in ckpt:  # up to 0.3.0: its epochs' length must be this run's
        other_data = where(saved.get("data") or args.data) != where(args.data)
        other_shapes = args.data == "shapes" and changed("shapes_train")
        if changed("batch_size") or other_data or other_shapes:
            fail(f"--resume {path} does not record the length of its epochs (written before "
                 "0.4.0): resume it with its --batch-size, --data and --shapes-train")  # fmt: skip
    if (differ := changed(*warn)) and int(os.environ.get("RANK", "0")) == 0:
        print(f"warning: resuming with changed {differ}", file=sys.stderr)
    return path, ckpt
