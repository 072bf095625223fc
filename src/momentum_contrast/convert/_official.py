"""The MoCo authors' v1/v2/v3 checkpoints into this library's pieces."""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from momentum_contrast.convert._layouts import rename, select_backbone
from momentum_contrast.convert._sources import (
    OFFICIAL_PREFIXES,
    LayoutError,
    State,
    flatten,
    read_checkpoint,
)
from momentum_contrast.convert._spec import module_heads, recorded_heads
from momentum_contrast.encoder import MomentumEncoder, unwrap_model
from momentum_contrast.queue import KeyQueue


def load_official_checkpoint(
    source: str | os.PathLike[str] | Mapping[str, Any],
    model: nn.Module,
    key_encoder: MomentumEncoder,
    *,
    queue: KeyQueue | None = None,
    predictor: nn.Module | None = None,
) -> dict[str, Any]:
    """Load a MoCo authors' checkpoint into this library's pieces, to continue training.

    v1/v2: ``model`` is ``nn.Sequential(backbone, moco_v2_head(dim))`` (or the v1 head),
    the queue is transposed from the authors' ``(dim, K)`` to ``(K, dim)``. v3: ``model``
    is ``nn.Sequential(backbone, moco_v3_projector(...))`` (what the key encoder
    follows) and ``predictor`` the ``moco_v3_predictor``. The backbone is a torchvision
    ResNet (``strip_classifier(resnet50())``) or a timm ViT, with the checkpoint's number
    of attention heads: the authors' ``vit_small`` and ``vit_base`` have 12
    (``timm.create_model("vit_small_patch16_224", num_classes=0, num_heads=12)``; timm's
    own ViT-S has 6), checked against the checkpoint's ``arch`` (without one it cannot be).
    The ``module.`` prefix may be stripped. Every piece is checked before any is loaded:
    on an error, none has changed.

    Args:
        source: path or loaded dict of the authors' checkpoint.
        model: the query encoder (backbone and head / projector), loaded in place.
        key_encoder: a ``MomentumEncoder`` of ``model``, loaded in place.
        queue: v1/v2 only: a ``KeyQueue(K, dim)``, loaded in place; None for a
            checkpoint without ``module.queue`` (the queue then starts afresh).
        predictor: v3 only: the predictor, loaded in place.

    Returns:
        ``{"kind", "epoch", "arch"}`` of the checkpoint (``"official_v1v2"`` or
        ``"official_v3"``).

    Raises:
        LayoutError: not an authors' checkpoint, or one that does not fit these pieces
            (another architecture, head count, head or queue size, a queue pointer out of
            range), with a one-line message.
        TypeError, ValueError: a piece of another type, a ``key_encoder`` that is not a
            ``MomentumEncoder`` of ``model``, or a piece the checkpoint has no place for.

    Examples:
        A stand-in for ``torch.load("moco_v2_800ep_pretrain.pth.tar", weights_only=True)``,
        with the authors' key names around a ResNet-18:

        >>> import torch, torchvision
        >>> from torch import nn
        >>> from momentum_contrast import KeyQueue, MomentumEncoder, moco_v2_head, strip_classifier
        >>> from momentum_contrast.convert import load_official_checkpoint
        >>> def resnet18_v2():
        ...     return nn.Sequential(strip_classifier(torchvision.models.resnet18())[0],
        ...                          moco_v2_head(512))
        >>> def authors_names(prefix, model):  # backbone at the top, the MLP head at fc
        ...     return {prefix + (k[2:] if k.startswith("0.") else "fc." + k[2:]): v
        ...             for k, v in model.state_dict().items()}
        >>> state = {**authors_names("module.encoder_q.", resnet18_v2()),
        ...          **authors_names("module.encoder_k.", resnet18_v2()),
        ...          "module.queue": nn.functional.normalize(torch.randn(128, 4096), dim=0),
        ...          "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
        >>> ckpt = {"epoch": 200, "arch": "resnet18", "state_dict": state}
        >>> model = resnet18_v2()
        >>> key_encoder, queue = MomentumEncoder(model), KeyQueue(4096, 128)
        >>> load_official_checkpoint(ckpt, model, key_encoder, queue=queue)
        {'kind': 'official_v1v2', 'epoch': 200, 'arch': 'resnet18'}
        >>> torch.equal(queue.keys, state["module.queue"].T)  # (dim, K) -> (K, dim)
        True
    """
    for name, value, expected, want in (
        ("model", model, nn.Module, "an nn.Module"),
        ("key_encoder", key_encoder, MomentumEncoder, "a MomentumEncoder of model"),
        ("queue", queue, (KeyQueue, type(None)), "a KeyQueue or None"),
        ("predictor", predictor, (nn.Module, type(None)), "an nn.Module or None"),
    ):
        if not isinstance(value, expected):
            raise TypeError(f"{name} must be {want}, got {type(value).__name__}")
    if key_encoder.online is not unwrap_model(model):
        raise ValueError(
            "key_encoder must be a MomentumEncoder of model (MomentumEncoder(model)): its "
            f"online model is another {type(key_encoder.online).__name__} object, which its "
            "updates would follow"
        )
    ckpt, kind, root = read_checkpoint(source)
    if kind not in OFFICIAL_PREFIXES:
        raise LayoutError(f"not a MoCo authors' checkpoint (this is a {kind} checkpoint)")
    state, others = flatten(ckpt["state_dict"])
    if others:
        name, value = next(iter(others.items()))
        raise LayoutError(f"'state_dict'[{name!r}] is a {type(value).__name__}, not a tensor")
    has_queue = root + "queue" in state
    if kind == "official_v1v2" and has_queue and queue is None:
        raise ValueError("a MoCo v1/v2 checkpoint has a queue: pass queue=KeyQueue(K, dim)")
    if kind == "official_v1v2" and not has_queue and queue is not None:
        raise LayoutError(
            f"the checkpoint holds no queue ({root}queue): pass queue=None and start from a "
            "fresh KeyQueue"
        )
    if kind == "official_v1v2" and has_queue and root + "queue_ptr" not in state:
        raise LayoutError(f"the checkpoint has {root}queue but no {root}queue_ptr")
    if kind == "official_v3" and predictor is None:
        raise ValueError("a MoCo v3 checkpoint has a predictor: pass predictor=...")
    if kind == "official_v3" and queue is not None:
        raise ValueError("a MoCo v3 checkpoint has no queue: pass queue=None")
    if kind == "official_v1v2" and predictor is not None:
        raise ValueError("a MoCo v1/v2 checkpoint has no predictor: pass predictor=None")
    targets = (("query", unwrap_model(model)), ("key", key_encoder.key_encoder))
    staged = {
        encoder: _staged(ckpt, state, root + OFFICIAL_PREFIXES[kind][encoder], encoder, target)
        for encoder, target in targets
    }
    name = ckpt.get("arch") or "checkpoint"
    loads = [(t, staged[e], f"the {name}'s {e} encoder") for e, t in targets]
    if queue is not None:
        keys = state[root + "queue"].T  # (dim, K) -> (K, dim)
        ptr = state[root + "queue_ptr"]  # (1,) -> (); any other shape: refused as it loads
        ptr = ptr.reshape(()) if ptr.numel() == 1 else ptr
        queue_state = {"keys": keys, "ptr": ptr, "length": torch.tensor(keys.shape[0])}
        loads.append((queue, queue_state, "the checkpoint's queue"))
    if predictor is not None:
        at = root + "predictor."
        weights = {k[len(at) :]: v for k, v in state.items() if k.startswith(at)}
        loads.append((predictor, weights, "the checkpoint's predictor"))
    for module, tensors, what in loads:  # every piece checked before any is written
        _check_fits(module, tensors, what)
    if queue is not None:  # its values too (a pointer out of range): loaded into a copy first
        try:
            copy.deepcopy(queue).load_state_dict(queue_state)
        except RuntimeError as e:  # torch's first line names the class; the last, the cause
            cause = str(e).strip().splitlines()[-1].strip()
            raise LayoutError(f"the checkpoint's queue does not fit: {cause}") from None
    for module, tensors, _ in loads:
        module.load_state_dict(tensors)
    return {"kind": kind, "epoch": ckpt.get("epoch"), "arch": ckpt.get("arch")}


def _staged(
    ckpt: Mapping[str, Any], state: State, at: str, encoder: str, target: nn.Module
) -> State:
    """The tensors of the encoder at ``at`` in ``state``, named as ``target =
    Sequential(backbone, head)`` names them."""
    children = list(target.children())
    if len(children) != 2:
        raise LayoutError(f"the {encoder} model must be nn.Sequential(backbone, head)")
    compiled = [""] * 2  # a torch.compile'd backbone or head names its tensors _orig_mod.*
    for i, child in enumerate(children):
        while isinstance(inner := getattr(child, "_orig_mod", None), nn.Module):
            compiled[i], child = compiled[i] + "_orig_mod.", inner
        children[i] = child
    what = f"the checkpoint's {encoder} encoder"
    found = select_backbone(state, None, at, what)
    ours = f"the {encoder} model's backbone"
    record, heads = recorded_heads(ckpt), module_heads(children[0], ours)
    if found.family != "resnet" and record and heads and record[0] != heads[0]:
        raise LayoutError(
            f"{ours} has {heads[0]} attention heads, the checkpoint "
            f"{record[0]} ({record[1]}): build it with num_heads={record[0]} (e.g. "
            f"timm.create_model(..., num_heads={record[0]}))"
        )
    naming = "timm" if "patch_embed.proj.weight" in children[0].state_dict() else "torchvision"
    backbone = rename(found.state, found.family, naming, what)
    (first, second), head = compiled, found.head
    return {f"0.{first}{k}": v for k, v in backbone.items()} | {
        f"1.{second}{k}": v for k, v in head.items()
    }


def _check_fits(module: nn.Module, state: State, what: str) -> None:
    """A one-line error where ``module.load_state_dict(state)`` (strict) would fail."""
    own = module.state_dict()
    problems = {
        "missing": sorted(own.keys() - state.keys()),
        "unexpected": sorted(state.keys() - own.keys()),
        "other shapes": [
            f"{k}: {tuple(state[k].shape)} in the checkpoint, {tuple(v.shape)} here"
            for k, v in own.items()
            if k in state and state[k].shape != v.shape
        ],
    }
    if listed := [f"{k} {v[:3]}{' ...' * (len(v) > 3)}" for k, v in problems.items() if v]:
        raise LayoutError(f"{what} does not fit this model: {'; '.join(listed)}")
