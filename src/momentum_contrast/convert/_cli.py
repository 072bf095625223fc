"""The command line ``python -m momentum_contrast.convert SRC DST --to ...``; it never
destroys a file by accident: never writes onto its source, never over an existing file
unless asked, and atomically (a temporary file in the destination's folder, then a
rename)."""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, NoReturn

import torch

from momentum_contrast.convert._backbone import convert_backbone
from momentum_contrast.convert._layouts import stem_note
from momentum_contrast.convert._sources import MODEL_KEY, LayoutError, State, first_line
from momentum_contrast.convert._spec import ModelSpec


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``error: ...``, exit status 2), as the rest."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m momentum_contrast.convert",
        description="Write the pre-trained backbone of a MoCo checkpoint for another library.",
    )
    p.add_argument(
        "src",
        help="checkpoint: this project's, the MoCo authors' v1/v2/v3, or any dict of tensors "
        "(a state dict, a Lightning checkpoint), searched by content",
    )
    p.add_argument(
        "dst",
        help="output file (.pth for torchvision/timm, .pkl for detectron2); never SRC, and "
        "an existing file only with --overwrite",
    )
    p.add_argument(
        "--to",
        required=True,
        choices=("torchvision", "timm", "detectron2"),
        help="the library whose names the output uses (detectron2: ResNets only)",
    )
    p.add_argument(
        "--encoder",
        default="query",
        choices=("query", "key"),
        help="the query encoder (default, as the authors) or the momentum encoder",
    )
    p.add_argument(
        "--prefix",
        help="the sub-dict to search, as a dotted path (e.g. state_dict.model), when SRC "
        "holds several encoders",
    )
    p.add_argument(
        "--num-heads",
        type=int,
        help="a ViT's number of attention heads, when SRC does not record it (the MoCo v3 "
        "authors' ViT-S: 12; DeiT's and timm's: 6)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    return p


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _write(state: State, spec: ModelSpec | None, dst: Path, to: str) -> None:
    """Write a state dict for torchvision and timm (with the ViT's ``ModelSpec`` record
    under ``"__model__"``), detectron2's pickle layout otherwise, to a temporary file next
    to ``dst``, then rename it to ``dst``."""
    payload: dict[str, Any] = {k: v.detach().clone() for k, v in state.items()}
    if to == "detectron2":  # the layout detectron2's checkpointer reads, as the authors'
        try:  # float32 for every floating dtype (NumPy has no bfloat16), as the authors
            arrays = {
                k: (v.float() if v.is_floating_point() else v).numpy() for k, v in payload.items()
            }
        except RuntimeError as e:  # torch without NumPy
            raise LayoutError(f"--to detectron2 writes NumPy arrays: install numpy ({e})") from None
        payload = {"model": arrays, "__author__": "momentum_contrast", "matching_heuristics": True}
    elif spec is not None:
        payload[MODEL_KEY] = spec.as_record()
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            (pickle.dump if to == "detectron2" else torch.save)(payload, f)
            f.flush()
            os.fsync(f.fileno())
        if dst.exists():  # --overwrite: the replaced file's permissions (a private one stays so)
            mode = dst.stat().st_mode & 0o7777
        else:  # mkstemp's 0600 -> what open() would have made
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)
        os.replace(tmp, dst)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    """The command line, ``python -m momentum_contrast.convert SRC DST --to ...``.

    ``DST`` is never ``SRC`` (also through links), an existing ``DST`` is replaced only
    with ``--overwrite``, and it is written to a temporary file first, then renamed. For a
    ViT, the model to build is printed and stored under ``"__model__"`` in ``DST``.

    Args:
        argv: the arguments (``sys.argv[1:]`` when ``None``).

    Returns:
        The exit status: 0, or 2 after one line ``error: ...`` on standard error.

    Examples:
        >>> from momentum_contrast.convert import main
        >>> main(["no_such_checkpoint.pt", "backbone.pth", "--to", "torchvision"])
        2
    """
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # argparse printed its usage and error (or the help: 0)
        return e.code if isinstance(e.code, int) else 2
    src, dst = Path(args.src), Path(args.dst)
    if dst.is_dir():
        return _fail(f"cannot write {dst}: it is a directory")
    if dst.exists() and src.exists() and os.path.samefile(src, dst):  # also through links
        return _fail(f"cannot write {dst}: it is the source checkpoint {src} (choose another DST)")
    if os.path.lexists(dst) and not args.overwrite:
        return _fail(f"cannot write {dst}: it exists (pass --overwrite to replace it)")
    try:
        with warnings.catch_warnings(record=True) as warned:  # each as one line
            warnings.simplefilter("always")
            state, spec, what = convert_backbone(
                args.src,
                encoder=args.encoder,
                to=args.to,
                num_heads=args.num_heads,
                prefix=args.prefix,
            )
    except (LayoutError, ValueError, TypeError, OSError) as e:
        return _fail(first_line(e))
    for warning in warned:
        print(f"warning: {first_line(warning.message)}", file=sys.stderr)  # type: ignore[arg-type]
    try:
        _write(state, spec, dst, args.to)
    except (LayoutError, OSError, RuntimeError) as e:  # a missing folder, no permission, ...
        return _fail(f"cannot write {dst}: {first_line(e)}")
    print(f"wrote {dst}: {len(state)} tensors of the backbone of {what}, for {args.to}")
    if "conv1.weight" in state and (note := stem_note(state)):  # a ResNet, not for detectron2
        print(f"note: {note}")
    if spec is not None:
        print(f"build the model with {spec}")
        print(f"(stored as {MODEL_KEY!r} in {dst}: pop it before load_state_dict)")
    return 0
