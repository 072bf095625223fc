"""Read a MoCo checkpoint and tell its kind (private; used by ``momentum_contrast.convert``).

Kinds, told apart by their keys (``backbone_state_dict`` does not depend on them: it
finds encoders by content, see ``_layouts``):

- ``project``: a checkpoint of this project's example scripts, ``{"recipe", "model",
  "key_encoder", "num_heads", ...}``.
- ``official_v1v2``: the MoCo v1/v2 authors' ``{"epoch", "arch", "state_dict",
  "optimizer"}`` with ``module.encoder_q.*``, ``module.encoder_k.*``, ``module.queue``
  ``(dim, K)`` and ``module.queue_ptr`` (the ``module.`` prefix may be stripped).
- ``official_v3``: the MoCo v3 authors' checkpoint, ``module.base_encoder.*`` (its head is
  the projector), ``module.momentum_encoder.*`` and ``module.predictor.*``.
- ``state_dict``: any other dict holding tensors, at any depth (a plain or converted
  state dict, a Lightning checkpoint, ...).
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

State = dict[str, torch.Tensor]

MODEL_KEY = "__model__"  # where a converted file keeps its ModelSpec's record
OFFICIAL_PREFIXES = {  # after the "module." of DistributedDataParallel, if any
    "official_v1v2": {"query": "encoder_q.", "key": "encoder_k."},
    "official_v3": {"query": "base_encoder.", "key": "momentum_encoder."},
}


class LayoutError(ValueError):
    """A file or state dict that is not a checkpoint this module understands: no backbone,
    several, an unknown layout, or one that does not fit the target. A ``ValueError``.

    Examples:
        >>> from momentum_contrast.convert import LayoutError, backbone_state_dict
        >>> try:
        ...     backbone_state_dict({"epoch": 3})
        ... except LayoutError as e:
        ...     print(str(e)[:26])
        unknown checkpoint layout:
    """


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, or the name of its type."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _load(path: Path) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` on the CPU, with one-line errors."""
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory, not a checkpoint file")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if not path.is_file():  # a device or a pipe: torch.load needs a file it can seek in
        raise LayoutError(f"{path} is not a regular file, not a checkpoint file")
    try:
        # torch's own warnings on a foreign pickle are left out: the error says what it is
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        why = f"{type(e).__name__}: {first_line(e)[:200]}"
        if cause := re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(e)):
            why = (
                f"a plain pickle, as detectron2's .pkl, or one it refuses: {cause[1].strip()[:100]}"
            )
        if pickled := re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e)):
            why = (  # torch.save(model): the whole module, its class by reference
                f"it pickles a {pickled[1]} object, as torch.save(model) does: if you trust "
                "the file, torch.load it with weights_only=False and pass its state_dict()"
            )
        raise LayoutError(
            f"{path} is not a PyTorch checkpoint that loads with weights_only=True ({why})"
        ) from None
    if not isinstance(loaded, dict):
        raise LayoutError(f"{path} holds a {type(loaded).__name__}, not a checkpoint dict")
    return loaded


def flatten(tree: Mapping[str, Any]) -> tuple[State, dict[str, Any]]:
    """``(tensors, other values)`` of every nested dict, keyed by dotted names (an
    optimizer's per-parameter keys as text); a converted file's ``"__model__"`` record is
    left out."""
    tensors: State = {}
    others: dict[str, Any] = {}

    def walk(mapping: Mapping[Any, Any], prefix: str) -> None:
        for key, value in mapping.items():
            if key == MODEL_KEY:
                continue
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}{key}"] = value
            elif isinstance(value, Mapping):
                walk(value, f"{prefix}{key}.")
            else:
                others[f"{prefix}{key}"] = value

    walk(tree, "")
    return tensors, others


def checkpoint_kind(checkpoint: str | os.PathLike[str] | Mapping[str, Any]) -> str:
    """Which kind of MoCo checkpoint this is.

    Args:
        checkpoint: a path, or the dict ``torch.load`` returned.

    Returns:
        ``"project"`` (this project's example scripts), ``"official_v1v2"`` or
        ``"official_v3"`` (the MoCo authors' releases), or ``"state_dict"`` (any other
        dict holding tensors: a plain or converted state dict, a Lightning checkpoint).

    Raises:
        LayoutError: anything else, naming what was expected and found.
        FileNotFoundError: no such file (``IsADirectoryError``: a directory).
        TypeError: neither a path nor a dict.

    Examples:
        >>> import torch
        >>> from momentum_contrast.convert import checkpoint_kind
        >>> checkpoint_kind({"epoch": 200, "arch": "resnet50",
        ...                  "state_dict": {"module.encoder_q.conv1.weight": torch.zeros(1)}})
        'official_v1v2'
    """
    return read_checkpoint(checkpoint, "checkpoint")[1]


def read_checkpoint(
    source: str | os.PathLike[str] | Mapping[str, Any], name: str = "source"
) -> tuple[Mapping[str, Any], str, str]:
    """``(checkpoint, kind, root)`` of a path (loaded with ``torch.load(path,
    weights_only=True)`` on the CPU) or of a dict already loaded, with one-line errors: its
    kind, as ``checkpoint_kind`` tells it, and the root of a MoCo authors' ``state_dict``
    keys (``"module."`` or ``""``; ``""`` for the other kinds). ``name``: the argument's,
    for a ``TypeError``."""
    if not isinstance(source, (str, os.PathLike, Mapping)):
        raise TypeError(
            f"{name} must be a path (str or os.PathLike) or a loaded checkpoint dict, got "
            f"{type(source).__name__}"
        )
    ckpt = source if isinstance(source, Mapping) else _load(Path(source))
    state = ckpt.get("state_dict")
    for mapping, what in ((ckpt, "the checkpoint"), (state, "'state_dict'")):
        if isinstance(mapping, Mapping) and (bad := [k for k in mapping if not isinstance(k, str)]):
            raise LayoutError(f"{what} has a key that is not a string: {bad[0]!r}")
    if "recipe" in ckpt and isinstance(ckpt.get("model"), Mapping):
        return ckpt, "project", ""
    keys = list(state) if isinstance(state, Mapping) else []
    for kind, prefixes in OFFICIAL_PREFIXES.items():
        for root in ("module.", ""):
            if any(k.startswith(root + prefixes["query"]) for k in keys):
                return ckpt, kind, root
    if flatten(ckpt)[0]:
        return ckpt, "state_dict", ""
    found = ", ".join(f"{k!r}" for k in list(ckpt)[:6]) or "an empty dict"
    raise LayoutError(
        "unknown checkpoint layout: expected a state dict (possibly nested, e.g. this "
        "project's 'model' and 'key_encoder', the MoCo authors' 'state_dict'), found no "
        f"tensors; keys {found}"
    )
