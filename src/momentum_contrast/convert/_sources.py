"""Read a MoCo checkpoint and pick out its query or key encoder (private; used by
``momentum_contrast.convert``).

Understood sources, told apart by their keys:

- ``project``: a checkpoint of this project's example scripts, ``{"recipe", "model",
  "key_encoder", ...}``; ``model`` is the query encoder (with a ``module.`` prefix when
  written under DDP by an older version), ``key_encoder`` the ``MomentumEncoder`` state.
- ``official_v1v2``: the MoCo v1/v2 authors' ``{"epoch", "arch", "state_dict",
  "optimizer"}`` with ``module.encoder_q.*``, ``module.encoder_k.*``, ``module.queue``
  ``(dim, K)`` and ``module.queue_ptr``.
- ``official_v3``: the MoCo v3 authors' checkpoint, ``module.base_encoder.*`` (its head is
  the projector), ``module.momentum_encoder.*`` and ``module.predictor.*``.
- ``state_dict``: a plain state dict holding one encoder (e.g. a converted backbone).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from momentum_contrast.convert._names import LayoutError, State

OFFICIAL_PREFIXES = {
    "official_v1v2": {"query": "module.encoder_q.", "key": "module.encoder_k."},
    "official_v3": {"query": "module.base_encoder.", "key": "module.momentum_encoder."},
}


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` on the CPU, with one-line errors."""
    path = Path(path)
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


def source_kind(ckpt: Mapping[str, Any]) -> str:
    """Which of the understood layouts ``ckpt`` is (see the module docstring)."""
    for mapping, what in ((ckpt, "the checkpoint"), (ckpt.get("state_dict"), "'state_dict'")):
        if isinstance(mapping, Mapping) and not all(isinstance(k, str) for k in mapping):
            bad = next(k for k in mapping if not isinstance(k, str))
            raise LayoutError(f"{what} has a key that is not a string: {bad!r}")
    if "recipe" in ckpt and isinstance(ckpt.get("model"), Mapping):
        return "project"
    state = ckpt.get("state_dict")
    if isinstance(state, Mapping):
        for kind, prefixes in OFFICIAL_PREFIXES.items():
            if any(k.startswith(prefixes["query"]) for k in state):
                return kind
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return "state_dict"
    if (
        isinstance(state, Mapping)
        and state
        and all(isinstance(v, torch.Tensor) for v in state.values())
    ):
        return "state_dict"
    found = ", ".join(f"{k!r}" for k in list(ckpt)[:6]) or "an empty dict"
    raise LayoutError(
        "unknown checkpoint layout: expected this project's checkpoint ('recipe', 'model', "
        "'key_encoder'), the MoCo authors' ('state_dict' with module.encoder_q./"
        f"module.base_encoder. keys) or a plain state dict; found keys {found}"
    )


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> State:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def encoder_state(ckpt: Mapping[str, Any], encoder: str) -> State:
    """The whole query or key encoder (backbone and head) of ``ckpt``, names unprefixed.

    For this project's checkpoints the query encoder is the recipe's model (v3: the base
    encoder inside ``Sequential(base, predictor)``; the predictor is left out), the key
    encoder the ``MomentumEncoder``'s copy.
    """
    if encoder not in ("query", "key"):
        raise ValueError(f"encoder must be 'query' or 'key', got {encoder!r}")
    kind = source_kind(ckpt)
    if kind in OFFICIAL_PREFIXES:
        state = _tensors(ckpt["state_dict"], "'state_dict'")
        return strip_prefix(state, OFFICIAL_PREFIXES[kind][encoder])
    if kind == "state_dict":
        if encoder == "key":
            raise LayoutError("a plain state dict holds one encoder: there is no key encoder")
        return _tensors(ckpt.get("state_dict", ckpt), "the state dict")
    if encoder == "key":
        key = ckpt.get("key_encoder")
        if not isinstance(key, Mapping):
            raise LayoutError("this checkpoint has no 'key_encoder' state")
        return strip_prefix(_tensors(key, "'key_encoder'"), "key_encoder.")
    model = {k.removeprefix("module."): v for k, v in _tensors(ckpt["model"], "'model'").items()}
    if ckpt.get("recipe") == "moco_v3":  # Sequential(Sequential(backbone, projector), predictor)
        return strip_prefix(model, "0.")
    return model


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
