"""Take the backbone out of a MoCo model or checkpoint, name it for torchvision, timm or
detectron2, and state the call that builds the model it loads into (private)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from torch import nn

from momentum_contrast.convert._heads import (
    check_num_heads,
    module_facts,
    module_heads,
    recorded_heads,
    resolve_heads,
)
from momentum_contrast.convert._names import RENAMES, LayoutError, State
from momentum_contrast.convert._select import select_backbone
from momentum_contrast.convert._sources import read_checkpoint, source_kind
from momentum_contrast.convert._spec import (
    ModelSpec,
    VitFacts,
    timm_pool,
    timm_spec,
    torchvision_spec,
    vit_shape,
)
from momentum_contrast.encoder import MomentumEncoder, unwrap_model

__all__ = ["Converted", "Source", "Target", "convert_backbone"]

Target = Literal["torchvision", "timm", "detectron2"]
Source = str | Path | Mapping[str, Any] | nn.Module


@dataclass(frozen=True)
class Converted:
    """A converted backbone, the model it loads into (None for a ResNet: the weights tell
    it all), and how to name it in messages."""

    state: State
    spec: ModelSpec | None
    what: str


def _tree(
    source: Source, encoder: str
) -> tuple[Mapping[str, Any], nn.Module | None, str | None, str, tuple[int, str] | None]:
    """``(state tree, module, encoder to select or None, what, recorded heads)``."""
    if isinstance(source, nn.Module):
        source = unwrap_model(source)  # torch.compile, DataParallel, DDP: the inner module
        if isinstance(source, MomentumEncoder):
            model = unwrap_model(source.online if encoder == "query" else source.key_encoder)
            return model.state_dict(), model, None, f"the MomentumEncoder's {encoder} encoder", None
        return source.state_dict(), source, encoder, type(source).__name__, None
    if not isinstance(source, (str, Path, Mapping)):
        raise TypeError(
            f"source must be a path, a checkpoint dict or an nn.Module, got {type(source).__name__}"
        )
    ckpt = read_checkpoint(source) if isinstance(source, (str, Path)) else source
    source_kind(ckpt)  # a one-line error for a dict that is no checkpoint
    what = str(source) if isinstance(source, (str, Path)) else "the checkpoint"
    return ckpt, None, encoder, what, recorded_heads(ckpt)


def convert_backbone(
    source: Source,
    *,
    encoder: str = "query",
    to: str = "torchvision",
    num_heads: int | None = None,
    prefix: str | None = None,
) -> Converted:
    """The backbone of ``source`` named as ``to`` names it, and its ``ModelSpec``
    (see ``backbone_state_dict`` and ``backbone_spec``)."""
    if encoder not in ("query", "key"):
        raise ValueError(f"encoder must be 'query' or 'key', got {encoder!r}")
    if to not in ("torchvision", "timm", "detectron2"):
        raise ValueError(f"to must be 'torchvision', 'timm' or 'detectron2', got {to!r}")
    if prefix is not None and not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
    check_num_heads(num_heads)
    tree, module, side, what, record = _tree(source, encoder)
    found = select_backbone(tree, side, prefix, what)
    label = "backbone" if side is None else f"{found.side} encoder"
    what = f"{what} ({label} at {found.prefix!r})" if found.prefix else what
    facts, heads_record = VitFacts(), record
    if module is not None:
        try:  # the module that holds the backbone's tensors
            backbone = module.get_submodule(found.prefix[:-1]) if found.prefix else module
        except AttributeError:  # a state dict named otherwise than the modules
            backbone = module
        facts, heads_record = module_facts(backbone), module_heads(backbone, what)
    rename = RENAMES.get((found.family, to))
    if rename is None:
        raise LayoutError(f"{what} is a {found.family} backbone: {to} takes ResNets only")
    if found.family == "resnet":
        if num_heads is not None:
            raise ValueError(f"num_heads applies to ViTs; {what} is a ResNet")
        return Converted(rename(found.state), None, what)
    shape = vit_shape(found.family, found.state, facts, what)
    if found.family == "vit_timm" and to == "torchvision":
        pool = timm_pool(shape, facts)
        if pool != "token" or shape["fc_norm"] or facts.fc_norm:
            norm = ", with fc_norm" if shape["fc_norm"] or facts.fc_norm else ""
            raise LayoutError(
                f"{what} is a timm ViT with global_pool={pool!r}{norm}: torchvision's "
                "VisionTransformer takes the class token after its final norm, so its "
                "features would differ (convert --to timm instead)"
            )
    state = rename(found.state)
    heads = resolve_heads(num_heads, heads_record, shape["dim"], what)
    if to == "torchvision":
        return Converted(state, torchvision_spec(shape, heads, what), what)
    return Converted(state, timm_spec(shape, heads, facts, state, what), what)
