"""The public functions of ``momentum_contrast.convert``: the backbone, the model it loads
into, and the kind of a checkpoint."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from momentum_contrast.convert._backbone import Source, Target, convert_backbone
from momentum_contrast.convert._sources import read_checkpoint, source_kind
from momentum_contrast.convert._spec import ModelSpec

__all__ = ["backbone_spec", "backbone_state_dict", "checkpoint_kind"]


def checkpoint_kind(checkpoint: str | Path | Mapping[str, Any]) -> str:
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

    Examples:
        >>> import torch
        >>> from momentum_contrast.convert import checkpoint_kind
        >>> checkpoint_kind({"epoch": 200, "arch": "resnet50",
        ...                  "state_dict": {"module.encoder_q.conv1.weight": torch.zeros(1)}})
        'official_v1v2'
    """
    ckpt = read_checkpoint(checkpoint) if isinstance(checkpoint, (str, Path)) else checkpoint
    return source_kind(ckpt)


def backbone_state_dict(
    source: Source,
    *,
    encoder: Literal["query", "key"] = "query",
    to: Target = "torchvision",
    num_heads: int | None = None,
    prefix: str | None = None,
) -> dict[str, torch.Tensor]:
    """The backbone of a MoCo model or checkpoint, named as ``to`` names it, without head.

    ``to="torchvision"`` loads into ``torchvision.models.resnet50()`` (or a torchvision
    ``VisionTransformer``) with only the classifier (``fc.*`` / ``heads.*``) missing;
    ``to="timm"`` into ``timm.create_model(..., num_classes=0)``; ``to="detectron2"``
    (ResNets) gives the names of the MoCo authors' detectron2 conversion. For a ViT,
    [`backbone_spec`][momentum_contrast.convert.backbone_spec] gives the model to build
    (its number of attention heads is not in the weights).

    The encoder is found by content (see the checkpointing guide): every nested dict of a
    checkpoint (or a module's ``state_dict()``) is searched for ResNet and ViT backbones;
    one on a path with ``key_encoder``, ``encoder_k`` or ``momentum`` is a key encoder.

    Args:
        source: a checkpoint path or loaded dict (this project's, the MoCo authors',
            a Lightning checkpoint, a state dict), a
            [`MomentumEncoder`][momentum_contrast.MomentumEncoder] (query = its online
            model, key = its key encoder), or a model such as
            ``nn.Sequential(backbone, head)`` or one holding a ``MomentumEncoder``;
            ``torch.compile``, ``DataParallel`` and DDP wrappers are looked through.
        encoder: ``"query"`` (default, as the authors) or ``"key"`` (the momentum encoder).
        to: the naming of the result.
        num_heads: a ViT's attention heads, where ``source`` does not record them.
        prefix: the sub-dict to search (a dotted path such as ``"state_dict.model"``),
            where ``source`` holds several encoders on the same side.

    Returns:
        ``{name: tensor}``, the tensors shared with ``source`` (clone before editing).

    Raises:
        LayoutError: (a ``ValueError``) no backbone, an ambiguous or unknown layout, a ViT
            whose head count is not recorded, or a target that cannot hold this backbone,
            with a one-line message.
        ValueError, TypeError: bad arguments, or ``num_heads`` against the record.

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
    done = convert_backbone(source, encoder=encoder, to=to, num_heads=num_heads, prefix=prefix)
    return dict(done.state)


def backbone_spec(
    source: Source,
    *,
    encoder: Literal["query", "key"] = "query",
    to: Target = "torchvision",
    num_heads: int | None = None,
    prefix: str | None = None,
) -> ModelSpec | None:
    """The model that ``backbone_state_dict(source, ...)`` (same arguments) loads into.

    For a ViT: ``torchvision.models.VisionTransformer(...)`` with every size named, or
    ``timm.create_model(name, num_classes=0, num_heads=..., ...)``, with the head count
    recorded in ``source`` (a module's attention layers, a checkpoint's ``num_heads``, the
    MoCo v3 authors' ``arch``: their ``vit_small`` has 12 heads where DeiT's has 6) or
    given as ``num_heads``. None for a ResNet (its weights say everything).

    Args:
        source: as for ``backbone_state_dict``.
        encoder: as for ``backbone_state_dict``.
        to: as for ``backbone_state_dict``.
        num_heads: as for ``backbone_state_dict``.
        prefix: as for ``backbone_state_dict``.

    Returns:
        A [`ModelSpec`][momentum_contrast.convert.ModelSpec], or None.

    Raises:
        LayoutError, ValueError, TypeError: as ``backbone_state_dict``.

    Examples:
        >>> import torchvision
        >>> from momentum_contrast.convert import backbone_spec
        >>> vit = torchvision.models.VisionTransformer(32, 8, 2, 4, 64, 128)
        >>> print(backbone_spec(vit, to="timm"))
        timm.create_model('vit_base_patch16_224', num_classes=0, img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0)
    """  # noqa: E501
    done = convert_backbone(source, encoder=encoder, to=to, num_heads=num_heads, prefix=prefix)
    return done.spec
