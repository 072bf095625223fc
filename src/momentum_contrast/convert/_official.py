"""The MoCo authors' v1/v2/v3 checkpoints into this library's pieces."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from momentum_contrast.convert._names import (
    FAMILIES,
    RENAMES,
    LayoutError,
    find_backbones,
    split_backbone,
)
from momentum_contrast.convert._sources import (
    encoder_state,
    load_strict,
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
    ResNet (``strip_classifier(resnet50())``) or a timm ViT.

    Args:
        source: path or loaded dict of the authors' checkpoint.
        model: the query encoder (backbone and head / projector), loaded in place.
        key_encoder: a ``MomentumEncoder`` of ``model``, loaded in place.
        queue: v1/v2 only: a ``KeyQueue(K, dim)``, loaded in place.
        predictor: v3 only: the predictor, loaded in place.

    Returns:
        ``{"kind", "epoch", "arch"}`` of the checkpoint (``"official_v1v2"`` or
        ``"official_v3"``).

    Raises:
        LayoutError: not an authors' checkpoint, or one that does not fit these pieces
            (another architecture, head or queue size), with a one-line message.

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
    state = ckpt["state_dict"]
    for encoder, target in (("query", unwrap_model(model)), ("key", key_encoder.key_encoder)):
        children = list(target.children())
        if len(children) != 2:
            raise LayoutError(f"the {encoder} model must be nn.Sequential(backbone, head)")
        family, backbone, head = split_backbone(
            encoder_state(ckpt, encoder), f"the {encoder} encoder"
        )
        ours = find_backbones(children[0].state_dict())
        naming = "timm" if ours and ours[0][1] == "vit_timm" else "torchvision"
        rename = RENAMES.get((family, naming), dict)
        head_prefix = FAMILIES[family][1]
        staged = {f"0.{k}": v for k, v in rename(backbone).items()}
        staged |= {f"1.{k[len(head_prefix) :]}": v for k, v in head.items()}
        load_strict(
            target, staged, f"the {ckpt.get('arch') or family} checkpoint's {encoder} encoder"
        )
    if kind == "official_v1v2":
        if queue is None:
            raise ValueError("a MoCo v1/v2 checkpoint has a queue: pass queue=KeyQueue(K, dim)")
        keys = state["module.queue"].T  # (dim, K) -> (K, dim)
        ptr = state["module.queue_ptr"].reshape(())
        load_strict(
            queue,
            {"keys": keys, "ptr": ptr, "length": torch.tensor(keys.shape[0])},
            "the checkpoint's queue",
        )
    else:
        if predictor is None:
            raise ValueError("a MoCo v3 checkpoint has a predictor: pass predictor=...")
        load_strict(
            predictor, strip_prefix(state, "module.predictor."), "the checkpoint's predictor"
        )
    return {"kind": kind, "epoch": ckpt.get("epoch"), "arch": ckpt.get("arch")}
