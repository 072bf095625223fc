"""Take the backbone out of a MoCo model or checkpoint, name it for torchvision, timm or
detectron2, and state the call that builds the model it loads into: ``backbone_state_dict``
and ``backbone_spec`` (private module; used by ``momentum_contrast.convert``)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import nn

from momentum_contrast.convert._layouts import (
    check_resnet_depth,
    is_key_path,
    rename,
    select_backbone,
)
from momentum_contrast.convert._sources import LayoutError, State, read_checkpoint
from momentum_contrast.convert._spec import (
    ModelSpec,
    count,
    module_grid,
    module_heads,
    recorded_heads,
    recorded_pool,
    vit_spec,
)
from momentum_contrast.encoder import MomentumEncoder, unwrap_model

Target = Literal["torchvision", "timm", "detectron2"]
Source = str | os.PathLike[str] | Mapping[str, Any] | nn.Module


def convert_backbone(
    source: Source,
    *,
    encoder: str = "query",
    to: str = "torchvision",
    num_heads: int | None = None,
    prefix: str | None = None,
) -> tuple[State, ModelSpec | None, str]:
    """``(backbone, spec, what)``: the backbone of ``source`` named as ``to`` names it, the
    model it loads into (None for a ResNet: the weights tell it all), and how messages name
    it (see ``backbone_state_dict`` and ``backbone_spec``)."""
    if encoder not in ("query", "key"):
        raise ValueError(f"encoder must be 'query' or 'key', got {encoder!r}")
    if to not in ("torchvision", "timm", "detectron2"):
        raise ValueError(f"to must be 'torchvision', 'timm' or 'detectron2', got {to!r}")
    if prefix is not None and not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
    if num_heads is not None and count(num_heads) is None:
        raise TypeError(f"num_heads must be an int, got {type(num_heads).__name__}")
    if num_heads is not None and num_heads <= 0:
        raise ValueError(f"num_heads must be positive, got {num_heads}")
    module: nn.Module | None = None
    side: str | None = encoder
    if isinstance(source, nn.Module):
        module = unwrap_model(source)  # torch.compile, DataParallel, DDP: the inner module
        what = type(module).__name__
        if isinstance(module, MomentumEncoder):
            what, side = f"the MomentumEncoder's {encoder} encoder", None
            module = unwrap_model(module.online if encoder == "query" else module.key_encoder)
        tree: Mapping[str, Any] = module.state_dict()
    elif isinstance(source, (str, os.PathLike, Mapping)):
        tree = read_checkpoint(source)[0]  # a one-line error for a dict that is no checkpoint
        what = "the checkpoint" if isinstance(source, Mapping) else os.fspath(source)
    else:
        raise TypeError(
            "source must be a path (str or os.PathLike), a checkpoint dict or an nn.Module, "
            f"got {type(source).__name__}"
        )
    found = select_backbone(tree, side, prefix, what)
    side = side and ("key" if is_key_path(found.prefix) else "query")
    label = f"{side} encoder" if side else "backbone"
    what = f"{what} ({label} at {found.prefix!r})" if found.prefix else what
    if found.family == "resnet":
        if num_heads is not None:
            raise ValueError(f"num_heads applies to ViTs; {what} is a ResNet")
        renamed = rename(found.state, found.family, to, what)  # a lost tensor: refused first
        check_resnet_depth(found.state, to, what, in_a_file=module is None)
        return renamed, None, what
    if to == "detectron2":
        raise LayoutError(f"{what} is a {found.family} backbone: {to} takes ResNets only")
    if any(k.startswith("pre_logits.") for k in found.head):  # torchvision's heads.pre_logits
        raise LayoutError(
            f"{what}: a torchvision ViT with a representation layer (heads.pre_logits, "
            "representation_size=...), whose output its features are: a converted backbone "
            "would give other features"
        )
    pool, record = recorded_pool(tree), recorded_heads(tree)  # a module's records nothing
    grid = None
    if module is not None:
        try:  # the module that holds the backbone's tensors ("": the module itself)
            backbone = module.get_submodule(found.prefix[:-1])
        except AttributeError:  # a state dict named otherwise than the modules
            backbone = module
        pool, record = getattr(backbone, "global_pool", None), module_heads(backbone, what)
        grid = module_grid(backbone)
    timm_names = rename(found.state, found.family, "timm", what)
    spec = vit_spec(timm_names, pool, num_heads, record, to, what, grid)
    return rename(found.state, found.family, to, what), spec, what


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
        LayoutError: (a ``ValueError``) no backbone, an ambiguous or unknown layout, a
            tensor or a ResNet layer lost, a ViT whose head count is not recorded, or a
            target that cannot hold this backbone (detectron2: a stem other than 7x7, or
            blocks per layer of no ResNet-18 to -152), with a one-line message.
        ValueError, TypeError: bad arguments, or ``num_heads`` against the record.

    Warns:
        UserWarning: ``to="torchvision"`` and a ResNet whose blocks per layer no
            torchvision builder has (a last block lost leaves no other trace).

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
    return convert_backbone(source, encoder=encoder, to=to, num_heads=num_heads, prefix=prefix)[0]


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
    given as ``num_heads``. None for a ResNet: its weights give its blocks and widths, not
    its stem's max-pool (a ``conv1`` other than 7x7, such as the example scripts' CIFAR
    stem, needs the same stem in the model built; the command line says so).

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
    return convert_backbone(source, encoder=encoder, to=to, num_heads=num_heads, prefix=prefix)[1]
