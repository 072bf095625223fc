"""The constructor call that rebuilds a converted ViT, for torchvision or timm (private;
used by ``momentum_contrast.convert``).

A ViT's weights give its width, depth, patch and image size, but not how a timm ViT
pools its tokens, nor its number of attention heads (the MoCo v3 authors' ViT-S has 12,
DeiT's and timm's 6): a conversion therefore says which model to build, as a `ModelSpec`.
The head count is read, in order, from the ``num_heads`` argument; a live module's
attention layers; a checkpoint's top-level ``num_heads`` (this project's example scripts
write it), the ``"__model__"`` record of a converted file, or the architecture name of
the MoCo v3 authors' checkpoints (``arch``: their ``vit_small`` and ``vit_base`` both
have 12 heads). A record that contradicts the argument is refused.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from momentum_contrast.convert._sources import MODEL_KEY, LayoutError, State

# The MoCo v3 authors' ViTs (their vits.py): architecture name -> attention heads.
AUTHORS_VIT_HEADS = {"vit_small": 12, "vit_base": 12, "vit_conv_small": 12, "vit_conv_base": 12}
# timm names whose defaults a spec starts from: embedding width -> (name, depth)
_TIMM_BASES = {
    192: ("vit_tiny_patch16_224", 12),
    384: ("vit_small_patch16_224", 12),
    768: ("vit_base_patch16_224", 12),
    1024: ("vit_large_patch16_224", 24),
}
# the tensors of a timm ViT whose create_model arguments a spec can state
_TIMM_KEYS = re.compile(
    r"cls_token|pos_embed|patch_embed\.proj\.(weight|bias)|(norm|fc_norm)\.(weight|bias)"
    r"|blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)"
)

# the tensors of each block of a timm ViT (and the biases of attn.qkv, unless qkv_bias=False)
_BLOCK = [
    *(
        f"{layer}.{p}"
        for layer in ("norm1", "norm2", "attn.proj", "mlp.fc1", "mlp.fc2")
        for p in ("weight", "bias")
    ),
    "attn.qkv.weight",
]


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


def count(value: Any) -> int | None:
    """``value`` if it is an int (not a bool), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def recorded_heads(ckpt: Mapping[str, Any]) -> tuple[int, str] | None:
    """``(heads, where it was read)`` from a checkpoint's record, or None."""
    if (n := count(ckpt.get("num_heads"))) is not None:
        return n, f"its num_heads entry ({n})"
    record = ckpt.get(MODEL_KEY)
    kwargs = record.get("kwargs") if isinstance(record, Mapping) else None
    if isinstance(kwargs, Mapping) and (n := count(kwargs.get("num_heads"))) is not None:
        return n, f"its {MODEL_KEY!r} record ({n})"
    arch = ckpt.get("arch")
    if isinstance(arch, str) and arch in AUTHORS_VIT_HEADS:
        n = AUTHORS_VIT_HEADS[arch]
        return n, f"its arch {arch!r} (the MoCo v3 authors' {arch} has {n} heads)"
    return None


def recorded_pool(ckpt: Mapping[str, Any]) -> str | None:
    """The pooling a converted file's ``"__model__"`` record builds (timm's default, the
    class token, where it states none; torchvision's ViT always takes it), or None."""
    record = ckpt.get(MODEL_KEY)
    kwargs = record.get("kwargs") if isinstance(record, Mapping) else None
    pool = kwargs.get("global_pool", "token") if isinstance(kwargs, Mapping) else None
    return pool if isinstance(pool, str) else None


def module_heads(module: nn.Module, what: str) -> tuple[int, str] | None:
    """``(heads, where)`` from the attention layers of a live module, or None."""
    found = {n for m in module.modules() if (n := count(getattr(m, "num_heads", None))) is not None}
    if len(found) > 1:
        raise LayoutError(f"{what}: attention layers with different head counts {sorted(found)}")
    return (found.pop(), "its attention layers") if found else None


def module_grid(module: nn.Module) -> tuple[tuple[int, int], bool] | None:
    """``((rows, columns) of patches, no_embed_class)`` of a live timm ViT, or None."""
    grid = getattr(getattr(module, "patch_embed", None), "grid_size", None)
    if not (isinstance(grid, tuple) and len(grid) == 2 and all(count(g) for g in grid)):
        return None
    return (grid[0], grid[1]), bool(getattr(module, "no_embed_class", False))


def vit_spec(
    state: State,
    pool: object,
    num_heads: int | None,
    record: tuple[int, str] | None,
    to: str,
    what: str,
    grid: tuple[tuple[int, int], bool] | None = None,
) -> ModelSpec:
    """``torchvision.models.VisionTransformer(...)`` with every size given by name, or
    ``timm.create_model(name, num_classes=0, num_heads=..., ...)``: the timm name of this
    width and every argument that differs from its defaults (heads always), for the ViT of
    ``state`` (named as timm names it). Width, depth, patch, image size, channels and
    options come from its tensors; its pooling is ``pool`` (a timm module's
    ``global_pool``) if a str, else timm's default for them; its heads ``num_heads`` or ``record``.

    The patch grid and whether the class token has a position row are ``grid`` (a live
    module's, see ``module_grid``) where given. Else (a file) the grid is square, and a
    class token has its own position row unless the rows alone form a square (timm's
    ``no_embed_class=True``): a ``g * g`` grid and one more row never do, but a
    ``(g - 1) * (g + 1)`` grid and one more row do, so a ViT trained on such non-square
    images converts right from the module only.
    """
    if unknown := [k for k in state if not _TIMM_KEYS.fullmatch(k)]:
        raise LayoutError(
            f"{what}: tensor {unknown[0]!r} is not part of a plain timm ViT (an option such "
            "as layer scale or registers, whose create_model arguments are not known here, "
            "or a tensor beside the backbone)"
        )
    indices = (int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    depth = 1 + max(indices, default=-1)
    qkv_bias = any(k.endswith(".attn.qkv.bias") for k in state)  # then every block has one
    per_block = [*_BLOCK, *["attn.qkv.bias"] * qkv_bias]
    needed = {f"blocks.{b}.{name}" for b in range(max(depth, 1)) for name in per_block}
    if lost := sorted({"patch_embed.proj.weight", *needed} - state.keys()):
        raise LayoutError(f"{what}: tensor {lost[0]!r} is missing (a ViT has it)")
    conv = state["patch_embed.proj.weight"]
    dim, in_chans, patch = conv.shape[0], conv.shape[1], conv.shape[-1]
    if patch != conv.shape[-2]:
        raise LayoutError(f"{what}: the patches are not square ({conv.shape[-2]}x{patch} pixels)")
    if (pos := state.get("pos_embed")) is None:
        raise LayoutError(f"{what}: a ViT without a learned or fixed position embedding")
    rows, class_token, fc_norm = pos.shape[-2], "cls_token" in state, "fc_norm.weight" in state
    if grid is None:
        no_embed_class = class_token and math.isqrt(rows) ** 2 == rows
        side = math.isqrt(patches := rows - int(class_token and not no_embed_class))
        if side * side != patches:
            raise LayoutError(f"{what}: {patches} patch positions are not a square grid")
        height = width = side
    else:
        (height, width), no_embed_class = grid
        no_embed_class = class_token and no_embed_class
        if height * width + int(class_token and not no_embed_class) != rows:
            raise LayoutError(f"{what}: pos_embed has {rows} rows for {height}x{width} patches")
    if "norm.weight" not in state and not fc_norm:
        raise LayoutError(f"{what}: a ViT without a final norm (norm.* or fc_norm.*)")
    mlp_dim = state["blocks.0.mlp.fc1.weight"].shape[0]
    if not isinstance(pool, str):
        pool = "avg" if fc_norm or not class_token else "token"
    if to == "torchvision" and (pool != "token" or fc_norm):
        raise LayoutError(
            f"{what} is a timm ViT with global_pool={pool!r}"
            f"{', with fc_norm' if fc_norm else ''}: torchvision's VisionTransformer "
            "takes the class token after its final norm, so its features would differ "
            "(convert --to timm instead)"
        )
    if to == "torchvision" and no_embed_class:
        raise LayoutError(
            f"{what}: pos_embed has no row for the class token (timm's no_embed_class=True"
            f"{'' if grid else '; a file: its rows read as a square grid'}): torchvision's "
            "ViT cannot take it"
        )
    if num_heads is None:
        if record is None:
            raise LayoutError(
                f"{what} is a ViT whose number of attention heads is not recorded, and the "
                "weights cannot tell it: give it (num_heads=, or --num-heads of python -m "
                "momentum_contrast.convert); the MoCo v3 authors' ViT-S and ViT-B have 12, "
                "DeiT's and timm's ViT-S 6 (as the example scripts' vit_small up to version "
                "0.2.0)"
            )
        num_heads = record[0]
    elif record is not None and record[0] != num_heads:
        raise ValueError(f"num_heads={num_heads} contradicts {what}: {record[1]}")
    if dim % num_heads:
        raise ValueError(f"num_heads must divide the ViT's width {dim}, got {num_heads}")
    image = height * patch if height == width else (height * patch, width * patch)
    if to == "torchvision":
        if height != width:
            raise LayoutError(f"{what}: torchvision's VisionTransformer takes square images")
        if in_chans != 3:
            raise LayoutError(f"{what}: torchvision's VisionTransformer takes 3 input channels")
        kwargs = {
            "image_size": image, "patch_size": patch, "num_layers": depth, "num_heads": num_heads,
            "hidden_dim": dim, "mlp_dim": mlp_dim,
        }  # fmt: skip
        return ModelSpec("torchvision.models.VisionTransformer", (), kwargs)
    name, base_depth = _TIMM_BASES.get(dim, _TIMM_BASES[768])
    wanted: list[tuple[str, Any, Any]] = [  # (argument, value, the timm name's default)
        ("img_size", image, 224),
        ("patch_size", patch, 16),
        ("in_chans", in_chans, 3),
        ("embed_dim", dim, dim if dim in _TIMM_BASES else 768),
        ("depth", depth, base_depth),
        ("num_heads", num_heads, None),  # always stated: the weights cannot tell it
        ("mlp_ratio", mlp_dim / dim, 4.0),
        ("qkv_bias", qkv_bias, True),
        ("class_token", class_token, True),
        ("no_embed_class", no_embed_class, False),
        ("global_pool", pool, "token"),
        ("fc_norm", fc_norm, pool in ("avg", "avgmax", "max")),
    ]
    kwargs = {"num_classes": 0} | {k: v for k, v, default in wanted if v != default}
    return ModelSpec("timm.create_model", (name,), kwargs)
