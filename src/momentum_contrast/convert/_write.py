"""Write a converted backbone without ever destroying a file by accident (private; used by
the command line): never onto its source, never over an existing file unless asked, and
atomically (a temporary file in the destination's folder, then a rename)."""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import IO, Any

import torch

from momentum_contrast.convert._names import LayoutError, State
from momentum_contrast.convert._spec import MODEL_KEY, ModelSpec


def check_destination(src: Path, dst: Path, overwrite: bool) -> str | None:
    """Why ``dst`` must not be written (a one-line reason), or None."""
    if dst.is_dir():
        return f"cannot write {dst}: it is a directory"
    if os.path.lexists(dst) and os.path.lexists(src):
        try:
            same = os.path.samefile(src, dst)  # also through symbolic and hard links
        except OSError:  # a dangling link
            same = False
        if same or os.path.realpath(src) == os.path.realpath(dst):
            return f"cannot write {dst}: it is the source checkpoint {src} (choose another DST)"
    if os.path.lexists(dst) and not overwrite:
        return f"cannot write {dst}: it exists (pass --overwrite to replace it)"
    return None


def payload(state: State, spec: ModelSpec | None, to: str) -> Any:
    """What the file holds: a state dict for torchvision and timm (with the ViT's
    ``ModelSpec`` record under ``"__model__"``), detectron2's pickle layout otherwise."""
    if to == "detectron2":  # the layout detectron2's checkpointer reads, as the authors'
        try:  # float32 for every floating dtype (NumPy has no bfloat16), as the authors
            arrays = {
                k: (v.detach().cpu().float() if v.is_floating_point() else v.detach().cpu()).numpy()
                for k, v in state.items()
            }
        except RuntimeError as e:  # torch without NumPy
            raise LayoutError(f"--to detectron2 writes NumPy arrays: install numpy ({e})") from None
        return {"model": arrays, "__author__": "momentum_contrast", "matching_heuristics": True}
    out: dict[str, Any] = {k: v.detach().clone() for k, v in state.items()}
    if spec is not None:
        out[MODEL_KEY] = spec.as_record()
    return out


def _dump(obj: Any, f: IO[bytes], to: str) -> None:
    if to == "detectron2":
        pickle.dump(obj, f)
    else:
        torch.save(obj, f)


def write_atomically(obj: Any, dst: Path, to: str) -> None:
    """Write ``obj`` to a temporary file next to ``dst``, then rename it to ``dst``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            _dump(obj, f, to)
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
