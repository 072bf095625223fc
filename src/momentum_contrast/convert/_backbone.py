"""The backbone of a MoCo model or checkpoint, named for torchvision, timm or detectron2."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from momentum_contrast.convert._names import RENAMES, LayoutError, State, split_backbone
from momentum_contrast.convert._sources import encoder_state, read_checkpoint, source_kind
from momentum_contrast.encoder import MomentumEncoder, unwrap_model

__all__ = ["Source", "Target", "backbone_state_dict", "checkpoint_kind"]

Target = Literal["torchvision", "timm", "detectron2"]
Source = str | Path | Mapping[str, Any] | nn.Module


def checkpoint_kind(checkpoint: str | Path | Mapping[str, Any]) -> str:
    """Which kind of MoCo checkpoint this is.

    Args:
        checkpoint: a path, or the dict ``torch.load`` returned.

    Returns:
        ``"project"`` (this project's example scripts), ``"official_v1v2"`` or
        ``"official_v3"`` (the MoCo authors' releases), or ``"state_dict"`` (a plain
        state dict, e.g. an already converted backbone).

    Raises:
        LayoutError: anything else, naming what was expected and found.

    Examples:
        >>> import torch
        >>> from momentum_contrast.convert import checkpoint_kind
        >>> checkpoint_kind({"epoch": 200, "arch": "resnet50",
        ...                  "state_dict": {"module.encoder_q.conv1.weight": torch.zeros(1)}})
        'official_v1v2'
    """
    ckpt = read_checkpoint(checkpoint) if isinstance(checkpoint, (str, Path)) else checkpoint
    return source_kind(ckpt)


def _encoder_of(source: Source, encoder: str) -> tuple[State, str]:
    """The whole encoder's state (names unprefixed) and how to name the source in errors."""
    if isinstance(source, MomentumEncoder):
        model = source.online if encoder == "query" else source.key_encoder
        return dict(model.state_dict()), f"the MomentumEncoder's {encoder} encoder"
    if isinstance(source, nn.Module):
        if encoder == "key":
            raise ValueError("encoder='key' needs a MomentumEncoder or a checkpoint")
        return dict(unwrap_model(source).state_dict()), type(source).__name__
    ckpt = read_checkpoint(source) if isinstance(source, (str, Path)) else source
    what = str(source) if isinstance(source, (str, Path)) else "the checkpoint"
    return encoder_state(ckpt, encoder), f"{what} ({encoder} encoder)"


def backbone_state_dict(
    source: Source, *, encoder: Literal["query", "key"] = "query", to: Target = "torchvision"
) -> dict[str, torch.Tensor]:
    """The backbone of a MoCo model or checkpoint, named as ``to`` names it, without head.

    ``to="torchvision"`` loads into ``torchvision.models.resnet50()`` (or a torchvision
    ``VisionTransformer``) with only the classifier (``fc.*`` / ``heads.*``) missing;
    ``to="timm"`` into ``timm.create_model(..., num_classes=0)``; ``to="detectron2"``
    (ResNets) gives the names of the MoCo authors' detectron2 conversion.

    Args:
        source: a checkpoint path or loaded dict (see the module docstring), a
            [`MomentumEncoder`][momentum_contrast.MomentumEncoder] (query = its online
            model, key = its key encoder), or a model such as
            ``nn.Sequential(backbone, head)``.
        encoder: ``"query"`` (default, as the authors) or ``"key"`` (the momentum encoder).
        to: the naming of the result.

    Returns:
        ``{name: tensor}``, the tensors shared with ``source`` (clone before editing).

    Raises:
        LayoutError: (a ``ValueError``) no backbone found, an unknown layout, or a target
            that cannot hold this backbone, with a one-line message.

    Examples:
        >>> import torch, torchvision
        >>> from momentum_contrast import MomentumEncoder, moco_v2_head, strip_classifier
        >>> from momentum_contrast.convert import backbone_state_dict
        >>> backbone, dim = strip_classifier(torchvision.models.resnet18())
        >>> key_encoder = MomentumEncoder(torch.nn.Sequential(backbone, moco_v2_head(dim)))
        >>> state = backbone_state_dict(key_encoder, encoder="key")
        >>> torchvision.models.resnet18().load_state_dict(state, strict=False)
        _IncompatibleKeys(missing_keys=['fc.weight', 'fc.bias'], unexpected_keys=[])
    """
    if encoder not in ("query", "key"):
        raise ValueError(f"encoder must be 'query' or 'key', got {encoder!r}")
    if to not in ("torchvision", "timm", "detectron2"):
        raise ValueError(f"to must be 'torchvision', 'timm' or 'detectron2', got {to!r}")
    state, what = _encoder_of(source, encoder)
    family, backbone, _ = split_backbone(state, what)
    rename = RENAMES.get((family, to))
    if rename is None:
        raise LayoutError(f"{what} is a {family} backbone: {to} takes ResNets only")
    return rename(backbone)
