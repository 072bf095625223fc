"""Recognise a backbone inside a state dict and rename it for torchvision, timm or
detectron2 (private; used by ``momentum_contrast.convert``).

Three backbone layouts are understood, found by an anchor key at some prefix:

- ``resnet``: torchvision's (and timm's) ResNet names, ``conv1.weight``, ``layer1.0...``,
  head at ``fc``;
- ``vit_torchvision``: ``torchvision.models.VisionTransformer``, ``conv_proj.weight``,
  ``encoder.layers.encoder_layer_N...``, head at ``heads``;
- ``vit_timm``: timm's ``VisionTransformer`` (and the MoCo v3 authors' ``vits.py``),
  ``patch_embed.proj.weight``, ``blocks.N...``, head at ``head``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping

import torch

State = dict[str, torch.Tensor]

# family: (anchor keys that must all exist, head prefix dropped from the backbone)
FAMILIES: dict[str, tuple[tuple[str, ...], str]] = {
    "resnet": (("conv1.weight", "bn1.weight", "layer1.0.conv1.weight"), "fc."),
    "vit_torchvision": (("conv_proj.weight", "encoder.ln.weight"), "heads."),
    "vit_timm": (("patch_embed.proj.weight", "blocks.0.norm1.weight"), "head."),
}


class LayoutError(ValueError):
    """A file or state dict that is not a checkpoint this module understands: no backbone,
    several, an unknown layout, or one that does not fit the target. A ``ValueError``.

    Examples:
        >>> from momentum_contrast.convert import LayoutError, backbone_state_dict
        >>> try:
        ...     backbone_state_dict({"epoch": 3})
        ... except LayoutError as e:
        ...     print(str(e)[:26])
        unknown checkpoint layout:
    """


def find_backbones(state: Mapping[str, torch.Tensor]) -> list[tuple[str, str]]:
    """Every ``(prefix, family)`` at which a whole backbone's anchor keys exist."""
    found = []
    for family, (anchors, _) in FAMILIES.items():
        first = anchors[0]
        for key in state:
            if key.endswith(first):
                prefix = key[: -len(first)]
                if all(prefix + a in state for a in anchors):
                    found.append((prefix, family))
    return found


def split_backbone(state: Mapping[str, torch.Tensor], what: str) -> tuple[str, State, State]:
    """``(family, backbone, head)`` of the single encoder in ``state``; names unprefixed.

    Raises:
        LayoutError: no backbone, or more than one, naming what was expected and found.
    """
    found = find_backbones(state)
    if len(found) != 1:
        sample = ", ".join(list(state)[:4]) or "no tensors at all"
        expected = "; ".join(f"{f}: {', '.join(a)}" for f, (a, _) in FAMILIES.items())
        if not found:
            raise LayoutError(
                f"{what} holds no backbone: expected the keys of a ResNet or ViT encoder "
                f"({expected}), found {len(state)} tensors ({sample}, ...)"
            )
        raise LayoutError(f"{what} holds {len(found)} backbones, at {found}: expected one")
    prefix, family = found[0]
    head_prefix = FAMILIES[family][1]
    backbone: State = {}
    head: State = {}
    for key, value in state.items():
        if key.startswith(prefix):
            name = key[len(prefix) :]
            (head if name.startswith(head_prefix) else backbone)[name] = value
    return family, backbone, head


_VIT_RENAMES = [  # (torchvision regex, timm template), one per tensor family
    (r"class_token", "cls_token"),
    (r"conv_proj\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"encoder\.pos_embedding", "pos_embed"),
    (r"encoder\.layers\.encoder_layer_(\d+)\.ln_1\.(\w+)", r"blocks.\1.norm1.\2"),
    (r"encoder\.layers\.encoder_layer_(\d+)\.ln_2\.(\w+)", r"blocks.\1.norm2.\2"),
    (r"encoder\.layers\.encoder_layer_(\d+)\.self_attention\.in_proj_(weight|bias)",
     r"blocks.\1.attn.qkv.\2"),
    (r"encoder\.layers\.encoder_layer_(\d+)\.self_attention\.out_proj\.(\w+)",
     r"blocks.\1.attn.proj.\2"),
    (r"encoder\.layers\.encoder_layer_(\d+)\.mlp\.0\.(\w+)", r"blocks.\1.mlp.fc1.\2"),
    (r"encoder\.layers\.encoder_layer_(\d+)\.mlp\.3\.(\w+)", r"blocks.\1.mlp.fc2.\2"),
    (r"encoder\.ln\.(\w+)", r"norm.\1"),
]  # fmt: skip
_VIT_RENAMES_BACK = [  # (timm regex, torchvision template): the same table, read backwards
    (r"cls_token", "class_token"),
    (r"patch_embed\.proj\.(weight|bias)", r"conv_proj.\1"),
    (r"pos_embed", "encoder.pos_embedding"),
    (r"blocks\.(\d+)\.norm1\.(\w+)", r"encoder.layers.encoder_layer_\1.ln_1.\2"),
    (r"blocks\.(\d+)\.norm2\.(\w+)", r"encoder.layers.encoder_layer_\1.ln_2.\2"),
    (r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)",
     r"encoder.layers.encoder_layer_\1.self_attention.in_proj_\2"),
    (r"blocks\.(\d+)\.attn\.proj\.(\w+)",
     r"encoder.layers.encoder_layer_\1.self_attention.out_proj.\2"),
    (r"blocks\.(\d+)\.mlp\.fc1\.(\w+)", r"encoder.layers.encoder_layer_\1.mlp.0.\2"),
    (r"blocks\.(\d+)\.mlp\.fc2\.(\w+)", r"encoder.layers.encoder_layer_\1.mlp.3.\2"),
    (r"norm\.(\w+)", r"encoder.ln.\1"),
]  # fmt: skip


def _rename(state: State, rules: list[tuple[str, str]], what: str) -> State:
    out = {}
    for key, value in state.items():
        for pattern, template in rules:
            if (m := re.fullmatch(pattern, key)) is not None:
                out[m.expand(template)] = value
                break
        else:
            raise LayoutError(f"{what}: tensor {key!r} has no counterpart")
    return out


def vit_torchvision_to_timm(state: State) -> State:
    """torchvision ``VisionTransformer`` names to timm's (same tensors, same order)."""
    return _rename(state, _VIT_RENAMES, "ViT tensor names to timm")


def vit_timm_to_torchvision(state: State) -> State:
    """timm ``VisionTransformer`` names (the MoCo v3 authors' too) to torchvision's.

    torchvision's ViT has a class token with its own position embedding and biases in the
    attention's input projection: a timm ViT without the former is refused, one without
    the latter (``qkv_bias=False``) gets zero biases, which compute the same."""
    pos = state.get("pos_embed")
    if "cls_token" not in state or pos is None:
        raise LayoutError("this timm ViT has no class token: torchvision's ViT needs one")
    rows = pos.shape[-2]
    if math.isqrt(rows) ** 2 == rows and math.isqrt(rows - 1) ** 2 != rows - 1:
        raise LayoutError(
            f"pos_embed has {rows} rows, none for the class token (timm's no_embed_class=True):"
            " torchvision's ViT cannot take it"
        )
    state = dict(state)
    for key in [k for k in state if k.endswith(".attn.qkv.weight")]:
        bias = key.removesuffix("weight") + "bias"
        if bias not in state:
            weight = state[key]
            state[bias] = weight.new_zeros(weight.shape[0])
    return _rename(state, _VIT_RENAMES_BACK, "ViT tensor names to torchvision")


def resnet_to_detectron2(state: State) -> State:
    """torchvision ResNet names to detectron2's, as the MoCo authors' conversion script:
    non-``layer`` keys under ``stem.``, ``layerN`` → ``res{N+1}``, ``bnK`` → ``convK.norm``,
    ``downsample.0`` → ``shortcut``, ``downsample.1`` → ``shortcut.norm``."""
    out = {}
    for key, value in state.items():
        name = key if "layer" in key else "stem." + key
        for n in (1, 2, 3, 4):
            name = name.replace(f"layer{n}", f"res{n + 1}")
        for k in (1, 2, 3):
            name = name.replace(f"bn{k}", f"conv{k}.norm")
        name = name.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
        out[name] = value
    return out


RENAMES: dict[tuple[str, str], Callable[[State], State]] = {
    ("resnet", "torchvision"): dict,
    ("resnet", "timm"): dict,  # timm's ResNets use torchvision's names
    ("resnet", "detectron2"): resnet_to_detectron2,
    ("vit_torchvision", "torchvision"): dict,
    ("vit_torchvision", "timm"): vit_torchvision_to_timm,
    ("vit_timm", "timm"): dict,
    ("vit_timm", "torchvision"): vit_timm_to_torchvision,
}
