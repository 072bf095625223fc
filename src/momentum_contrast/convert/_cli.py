"""The command line ``python -m momentum_contrast.convert SRC DST --to ...``."""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

import torch

from momentum_contrast.convert._backbone import Target, backbone_state_dict
from momentum_contrast.convert._names import LayoutError, State

__all__ = ["main"]


def _save(state: State, dst: Path, to: Target) -> None:
    if to == "detectron2":  # the layout detectron2's checkpointer reads, as the authors'
        try:
            arrays = {k: v.detach().cpu().numpy() for k, v in state.items()}
        except RuntimeError as e:  # torch without NumPy
            raise LayoutError(f"--to detectron2 writes NumPy arrays: install numpy ({e})") from None
        payload = {"model": arrays, "__author__": "momentum_contrast", "matching_heuristics": True}
        with open(dst, "wb") as f:
            pickle.dump(payload, f)
    else:
        torch.save({k: v.detach().clone() for k, v in state.items()}, dst)


def main(argv: list[str] | None = None) -> int:
    """The command line, ``python -m momentum_contrast.convert SRC DST --to ...``.

    Args:
        argv: the arguments (``sys.argv[1:]`` when ``None``).

    Returns:
        The exit status: 0, or 2 after one line ``error: ...`` on standard error.

    Examples:
        >>> from momentum_contrast.convert import main
        >>> main(["no_such_checkpoint.pt", "backbone.pth", "--to", "torchvision"])
        2
    """
    p = argparse.ArgumentParser(
        prog="python -m momentum_contrast.convert",
        description="Write the pre-trained backbone of a MoCo checkpoint for another library.",
    )
    p.add_argument(
        "src", help="checkpoint: this project's, the MoCo authors' v1/v2/v3, or a state dict"
    )
    p.add_argument("dst", help="output file (.pth for torchvision/timm, .pkl for detectron2)")
    p.add_argument("--to", required=True, choices=("torchvision", "timm", "detectron2"))
    p.add_argument(
        "--encoder",
        default="query",
        choices=("query", "key"),
        help="the query encoder (default, as the authors) or the momentum encoder",
    )
    args = p.parse_args(argv)
    try:
        state = backbone_state_dict(args.src, encoder=args.encoder, to=args.to)
    except (LayoutError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        _save(state, Path(args.dst), args.to)
    except (LayoutError, OSError, RuntimeError) as e:  # a missing folder, a directory, ...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: cannot write {args.dst}: {reason}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.dst}: {len(state)} tensors of the {args.encoder} encoder's backbone "
        f"for {args.to}"
    )
    return 0
