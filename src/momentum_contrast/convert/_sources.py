"""Read a MoCo checkpoint, tell its kind, and pick out the MoCo authors' encoders (private;
used by ``momentum_contrast.convert``).

Kinds, told apart by their keys (``backbone_state_dict`` does not depend on them: it
finds encoders by content, see ``_select``):

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

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from momentum_contrast.convert._names import LayoutError, State

OFFICIAL_PREFIXES = {  # after the "module." of DistributedDataParallel, if any
    "official_v1v2": {"query": "encoder_q.", "key": "encoder_k."},
    "official_v3": {"query": "base_encoder.", "key": "momentum_encoder."},
}


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` on the CPU, with one-line errors."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory, not a checkpoint file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LayoutError(
            f"{path} is not a PyTorch checkpoint that loads with weights_only=True "
            f"({type(e).__name__}: {reason[:200]})"
        ) from None
    if not isinstance(loaded, dict):
        raise LayoutError(f"{path} holds a {type(loaded).__name__}, not a checkpoint dict")
    return loaded


def _tensors(mapping: Mapping[str, Any], what: str) -> State:
    """``mapping`` as a state dict: string keys and tensor values, else a ``LayoutError``."""
    for k, v in mapping.items():
        if not isinstance(k, str):
            raise LayoutError(f"{what} has a key that is not a string: {k!r}")
        if not isinstance(v, torch.Tensor):
            raise LayoutError(f"{what}[{k!r}] is a {type(v).__name__}, not a tensor")
    return dict(mapping)


def _has_tensors(mapping: Mapping[Any, Any]) -> bool:
    return any(
        isinstance(v, torch.Tensor) or (isinstance(v, Mapping) and _has_tensors(v))
        for v in mapping.values()
    )


def official_root(ckpt: Mapping[str, Any]) -> tuple[str, str] | None:
    """``(kind, root)`` of a MoCo authors' checkpoint (root ``"module."`` or ``""``)."""
    state = ckpt.get("state_dict")
    if not isinstance(state, Mapping):
        return None
    for kind, prefixes in OFFICIAL_PREFIXES.items():
        for root in ("module.", ""):
            if any(k.startswith(root + prefixes["query"]) for k in state):
                return kind, root
    return None


def source_kind(ckpt: Mapping[str, Any]) -> str:
    """Which of the kinds above ``ckpt`` is (see the module docstring)."""
    for mapping, what in ((ckpt, "the checkpoint"), (ckpt.get("state_dict"), "'state_dict'")):
        if isinstance(mapping, Mapping) and not all(isinstance(k, str) for k in mapping):
            bad = next(k for k in mapping if not isinstance(k, str))
            raise LayoutError(f"{what} has a key that is not a string: {bad!r}")
    if "recipe" in ckpt and isinstance(ckpt.get("model"), Mapping):
        return "project"
    if (official := official_root(ckpt)) is not None:
        return official[0]
    if _has_tensors(ckpt):
        return "state_dict"
    found = ", ".join(f"{k!r}" for k in list(ckpt)[:6]) or "an empty dict"
    raise LayoutError(
        "unknown checkpoint layout: expected a state dict (possibly nested, e.g. this "
        "project's 'model' and 'key_encoder', the MoCo authors' 'state_dict'), found no "
        f"tensors; keys {found}"
    )


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> State:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def official_encoder(ckpt: Mapping[str, Any], encoder: str) -> State:
    """The whole query or key encoder (backbone and head) of a MoCo authors' checkpoint,
    names unprefixed."""
    kind, root = official_root(ckpt) or ("", "")
    state = _tensors(ckpt["state_dict"], "'state_dict'")
    return strip_prefix(state, root + OFFICIAL_PREFIXES[kind][encoder])


def load_strict(module: nn.Module, state: State, what: str) -> None:
    """``load_state_dict(strict=True)``, with a one-line error on any mismatch."""
    own = module.state_dict()
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    shapes = [
        f"{k}: {tuple(state[k].shape)} in the checkpoint, {tuple(v.shape)} here"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        problems = [
            f"{label} {items[:3]}{' ...' if len(items) > 3 else ''}"
            for label, items in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("other shapes", shapes),
            )
            if items
        ]
        raise LayoutError(
            f"{what} does not fit this model (another architecture?): " + "; ".join(problems)
        )
    module.load_state_dict(state)
