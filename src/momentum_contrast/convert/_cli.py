"""The command line ``python -m momentum_contrast.convert SRC DST --to ...``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

from momentum_contrast.convert._backbone import convert_backbone
from momentum_contrast.convert._names import LayoutError
from momentum_contrast.convert._spec import MODEL_KEY
from momentum_contrast.convert._write import check_destination, payload, write_atomically

__all__ = ["main"]


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


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
        type=_positive,
        help="a ViT's number of attention heads, when SRC does not record it (the MoCo v3 "
        "authors' ViT-S: 12; DeiT's and timm's: 6)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    return p


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _reason(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


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
    args = _parser().parse_args(argv)
    src, dst = Path(args.src), Path(args.dst)
    if (refused := check_destination(src, dst, args.overwrite)) is not None:
        return _fail(refused)
    try:
        done = convert_backbone(
            args.src, encoder=args.encoder, to=args.to, num_heads=args.num_heads, prefix=args.prefix
        )
    except (LayoutError, ValueError, TypeError, OSError) as e:
        return _fail(_reason(e))
    try:
        write_atomically(payload(done.state, done.spec, args.to), dst, args.to)
    except (LayoutError, OSError, RuntimeError) as e:  # a missing folder, no permission, ...
        return _fail(f"cannot write {dst}: {_reason(e)}")
    print(f"wrote {dst}: {len(done.state)} tensors of the backbone of {done.what}, for {args.to}")
    if done.spec is not None:
        print(f"build the model with {done.spec}")
        print(f"(stored as {MODEL_KEY!r} in {dst}: pop it before load_state_dict)")
    return 0
