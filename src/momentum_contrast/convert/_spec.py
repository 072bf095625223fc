"""The constructor call that rebuilds a converted ViT, for torchvision or timm (private;
used by ``momentum_contrast.convert``).

A ViT's weights give its width, depth, patch and image size, but not its number of
attention heads (the MoCo v3 authors' ViT-S has 12, DeiT's and timm's 6), nor how a timm
ViT pools its tokens: a conversion therefore says which model to build, as a `ModelSpec`.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from momentum_contrast.convert._names import LayoutError, State

MODEL_KEY = "__model__"  # where a converted file keeps the ModelSpec's record

# timm names whose defaults a spec starts from: embedding width -> (name, depth, heads)
_TIMM_BASES = {
    192: ("vit_tiny_patch16_224", 12, 3),
    384: ("vit_small_patch16_224", 12, 6),
    768: ("vit_base_patch16_224", 12, 12),
    1024: ("vit_large_patch16_224", 24, 16),
}
# the tensors of a timm ViT whose create_model arguments a spec can state
_TIMM_KEYS = re.compile(
    r"cls_token|pos_embed|patch_embed\.proj\.(weight|bias)|(norm|fc_norm)\.(weight|bias)"
    r"|blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)"
)


@dataclass(frozen=True)
class ModelSpec:
    """The call that builds the model a converted backbone loads into: for a ViT, what its
    weights cannot tell (the number of attention heads, timm's pooling) made explicit.

    ``backbone_spec`` returns it; the command line prints it and stores its
    ``as_record()`` under ``"__model__"`` in the file it writes.

    Attributes:
        builder: dotted name of the callable: ``"timm.create_model"`` or
            ``"torchvision.models.VisionTransformer"``.
        args: its positional arguments.
        kwargs: its keyword arguments.

    Examples:
        >>> from momentum_contrast.convert import ModelSpec
        >>> spec = ModelSpec("timm.create_model", ("vit_small_patch16_224",),
        ...                  {"num_classes": 0, "num_heads": 12})
        >>> print(spec)
        timm.create_model('vit_small_patch16_224', num_classes=0, num_heads=12)
        >>> ModelSpec.from_record(spec.as_record()) == spec
        True
    """

    builder: str
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        parts = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"{self.builder}({', '.join(parts)})"

    def build(self) -> nn.Module:
        """Import the library (timm or torchvision) and call the builder."""
        module, _, name = self.builder.rpartition(".")
        model: nn.Module = getattr(importlib.import_module(module), name)(*self.args, **self.kwargs)
        return model

    def as_record(self) -> dict[str, Any]:
        """Plain Python values (loadable with ``weights_only=True``), and the call as text."""
        return {
            "builder": self.builder,
            "args": list(self.args),
            "kwargs": dict(self.kwargs),
            "call": str(self),
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> ModelSpec:
        """The spec that ``as_record()`` wrote."""
        return cls(str(record["builder"]), tuple(record["args"]), dict(record["kwargs"]))


@dataclass(frozen=True)
class VitFacts:
    """What only a live timm ViT module tells (None where unknown, e.g. a state dict)."""

    global_pool: str | None = None
    fc_norm: bool | None = None
    no_embed_class: bool | None = None


def _square(n: int, what: str) -> int:
    side = math.isqrt(n)
    if side * side != n:
        raise LayoutError(f"{what}: {n} patch positions are not a square grid")
    return side


def vit_shape(family: str, state: State, facts: VitFacts, what: str) -> dict[str, Any]:
    """Width, depth, patch, image size, channels and options of a ViT, from its tensors."""
    tv = family == "vit_torchvision"
    conv = state["conv_proj.weight" if tv else "patch_embed.proj.weight"]
    if conv.shape[-1] != conv.shape[-2]:
        raise LayoutError(f"{what}: the patches are not square ({tuple(conv.shape[-2:])})")
    block = r"encoder\.layers\.encoder_layer_(\d+)\." if tv else r"blocks\.(\d+)\."
    depth = len({m.group(1) for k in state if (m := re.match(block, k))})
    fc1 = "encoder.layers.encoder_layer_0.mlp.0.weight" if tv else "blocks.0.mlp.fc1.weight"
    pos = state.get("encoder.pos_embedding" if tv else "pos_embed")
    if pos is None:
        raise LayoutError(f"{what}: a ViT without a learned or fixed position embedding")
    rows, class_token = pos.shape[-2], tv or "cls_token" in state
    no_embed_class = facts.no_embed_class
    if no_embed_class is None:  # a class row exists unless the rows alone form a square grid
        no_embed_class = not tv and math.isqrt(rows) ** 2 == rows
    grid = _square(rows - int(class_token and not no_embed_class), what)
    return {
        "dim": conv.shape[0], "in_chans": conv.shape[1], "patch": conv.shape[-1],
        "image": grid * conv.shape[-1], "depth": depth, "mlp_dim": state[fc1].shape[0],
        "class_token": class_token, "no_embed_class": class_token and no_embed_class,
        "qkv_bias": tv or "blocks.0.attn.qkv.bias" in state,
        "fc_norm": "fc_norm.weight" in state, "norm": tv or "norm.weight" in state,
    }  # fmt: skip


def timm_pool(shape: Mapping[str, Any], facts: VitFacts) -> str:
    """The pooling of a timm ViT: the module's, else timm's default for its tensors."""
    if facts.global_pool is not None:
        return facts.global_pool
    return "avg" if shape["fc_norm"] or not shape["class_token"] else "token"


def torchvision_spec(shape: Mapping[str, Any], heads: int, what: str) -> ModelSpec:
    """``torchvision.models.VisionTransformer(...)`` with every size given by name."""
    if shape["in_chans"] != 3:
        raise LayoutError(f"{what}: torchvision's VisionTransformer takes 3 input channels")
    kwargs = {
        "image_size": shape["image"], "patch_size": shape["patch"],
        "num_layers": shape["depth"], "num_heads": heads,
        "hidden_dim": shape["dim"], "mlp_dim": shape["mlp_dim"],
    }  # fmt: skip
    return ModelSpec("torchvision.models.VisionTransformer", (), kwargs)


def timm_spec(
    shape: Mapping[str, Any], heads: int, facts: VitFacts, state: State, what: str
) -> ModelSpec:
    """``timm.create_model(name, num_classes=0, num_heads=..., ...)``: the timm name of
    this width and every argument that differs from its defaults (heads always)."""
    if unknown := [k for k in state if not _TIMM_KEYS.fullmatch(k)]:
        raise LayoutError(
            f"{what}: tensor {unknown[0]!r} belongs to a timm ViT option (layer scale, "
            "registers, ...) whose create_model arguments are not known here"
        )
    if not shape["norm"] and not shape["fc_norm"]:
        raise LayoutError(f"{what}: a ViT without a final norm (norm.* or fc_norm.*)")
    name, depth, _ = _TIMM_BASES.get(shape["dim"], _TIMM_BASES[768])
    pool = timm_pool(shape, facts)
    fc_norm = facts.fc_norm if facts.fc_norm is not None else shape["fc_norm"]
    wanted: list[tuple[str, Any, Any]] = [  # (argument, value, the timm name's default)
        ("img_size", shape["image"], 224),
        ("patch_size", shape["patch"], 16),
        ("in_chans", shape["in_chans"], 3),
        ("embed_dim", shape["dim"], shape["dim"] if shape["dim"] in _TIMM_BASES else 768),
        ("depth", shape["depth"], depth),
        ("num_heads", heads, None),  # always stated: the weights cannot tell it
        ("mlp_ratio", shape["mlp_dim"] / shape["dim"], 4.0),
        ("qkv_bias", shape["qkv_bias"], True),
        ("class_token", shape["class_token"], True),
        ("no_embed_class", shape["no_embed_class"], False),
        ("global_pool", pool, "token"),
        ("fc_norm", fc_norm, pool in ("avg", "avgmax", "max")),
    ]
    kwargs = {"num_classes": 0} | {k: v for k, v, default in wanted if v != default}
    return ModelSpec("timm.create_model", (name,), kwargs)
