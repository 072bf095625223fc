"""The MoCo authors' v1/v2/v3 checkpoints into this library's pieces."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from momentum_contrast.convert._heads import module_heads, recorded_heads
from momentum_contrast.convert._names import (
    FAMILIES,
    RENAMES,
    LayoutError,
    find_backbones,
    split_backbone,
)
from momentum_contrast.convert._sources import (
    load_strict,
    official_encoder,
    official_root,
    read_checkpoint,
    source_kind,
    strip_prefix,
)
from momentum_contrast.encoder import MomentumEncoder, unwrap_model
from momentum_contrast.queue import KeyQueue

__all__ = ["load_official_checkpoint"]


def load_official_checkpoint(
    source: str | Path | Mapping[str, Any],
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
    own ViT-S has 6). The ``module.`` prefix may be stripped.

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
            (another architecture, head count, head or queue size), with a one-line
            message.

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
    ckpt = read_checkpoint(source) if isinstance(source, (str, Path)) else source
    kind = source_kind(ckpt)
    if kind not in ("official_v1v2", "official_v3"):
        raise LayoutError(f"not a MoCo authors' checkpoint (this is a {kind} checkpoint)")
    state, root = ckpt["state_dict"], (official_root(ckpt) or ("", ""))[1]
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
    targets = (("query", unwrap_model(model)), ("key", key_encoder.key_encoder))
    staged = {encoder: _staged(ckpt, encoder, target) for encoder, target in targets}
    for encoder, target in targets:
        what = f"the {ckpt.get('arch') or 'checkpoint'}'s {encoder} encoder"
        load_strict(target, staged[encoder], what)
    if queue is not None:
        keys = state[root + "queue"].T  # (dim, K) -> (K, dim)
        ptr = state[root + "queue_ptr"].reshape(())
        load_strict(
            queue,
            {"keys": keys, "ptr": ptr, "length": torch.tensor(keys.shape[0])},
            "the checkpoint's queue",
        )
    if predictor is not None and kind == "official_v3":
        load_strict(
            predictor, strip_prefix(state, root + "predictor."), "the checkpoint's predictor"
        )
    return {"kind": kind, "epoch": ckpt.get("epoch"), "arch": ckpt.get("arch")}


def _staged(ckpt: Mapping[str, Any], encoder: str, target: nn.Module) -> dict[str, torch.Tensor]:
    """The ``encoder``'s tensors, named as ``target = Sequential(backbone, head)`` names them."""
    children = list(target.children())
    if len(children) != 2:
        raise LayoutError(f"the {encoder} model must be nn.Sequential(backbone, head)")
    family, backbone, head = split_backbone(
        official_encoder(ckpt, encoder), f"the {encoder} encoder"
    )
    if family != "resnet":
        _check_heads(ckpt, children[0], f"the {encoder} model's backbone")
    ours = find_backbones(children[0].state_dict())
    naming = "timm" if ours and ours[0][1] == "vit_timm" else "torchvision"
    rename = RENAMES.get((family, naming), dict)
    head_prefix = FAMILIES[family][1]
    staged = {f"0.{k}": v for k, v in rename(backbone).items()}
    return staged | {f"1.{k[len(head_prefix) :]}": v for k, v in head.items()}


def _check_heads(ckpt: Mapping[str, Any], backbone: nn.Module, what: str) -> None:
    """Refuse a ViT whose attention heads differ from the checkpoint's record."""
    record, ours = recorded_heads(ckpt), module_heads(backbone, what)
    if record is not None and ours is not None and record[0] != ours[0]:
        raise LayoutError(
            f"{what} has {ours[0]} attention heads, the checkpoint {record[0]} ({record[1]}): "
            f"build it with num_heads={record[0]} (e.g. timm.create_model(..., "
            f"num_heads={record[0]}))"
        )
