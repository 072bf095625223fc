"""The backbone layouts that ``momentum_contrast.convert`` reads (private): where a
ResNet or a ViT sits in a checkpoint, found by its content, and its tensors' names in
torchvision, timm and detectron2.

Every nested dict of the checkpoint is flattened into dotted names (``state_dict`` →
``model`` → ``0.conv1.weight`` gives ``state_dict.model.0.conv1.weight``); a backbone
is wherever the anchor keys of a ResNet or ViT sit (``FAMILIES``), at any prefix. A
backbone whose path has a part named ``key_encoder`` (a ``MomentumEncoder``'s state),
``encoder_k`` (MoCo v1/v2) or a ``_``-separated word ``momentum`` (``momentum_encoder``,
``backbone_momentum``) is a key encoder; any other is a query encoder. The float32
``ema_shadow`` copy in a 0.3.0 ``MomentumEncoder``'s state is not a separate encoder.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from momentum_contrast.convert._sources import LayoutError, State, flatten

# family: (anchor keys that must all exist, head prefix dropped from the backbone)
FAMILIES: dict[str, tuple[tuple[str, ...], str]] = {
    # torchvision's ResNet names, which timm's ResNets share
    "resnet": (("conv1.weight", "bn1.weight", "layer1.0.conv1.weight"), "fc."),
    # torchvision.models.VisionTransformer
    "vit_torchvision": (("conv_proj.weight", "encoder.ln.weight"), "heads."),
    # timm's VisionTransformer, and the MoCo v3 authors' vits.py
    "vit_timm": (("patch_embed.proj.weight", "blocks.0.norm1.weight"), "head."),
}
KEY_NAMES = ("key_encoder", "encoder_k")
SHADOW = "ema_shadow"  # 0.3.0's float32 copies of the key weights


def find_backbones(state: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Every ``(prefix, family)`` at which a whole backbone's anchor keys exist."""
    found = []
    for family, (anchors, _) in FAMILIES.items():
        for key in state:
            if key.endswith(anchors[0]):
                prefix = key[: -len(anchors[0])]
                if all(prefix + a in state for a in anchors):
                    found.append((prefix, family))
    return found


def is_key_path(prefix: str) -> bool:
    """Whether a backbone at ``prefix`` is named as a key (momentum) encoder."""
    return any(part in KEY_NAMES or "momentum" in part.split("_") for part in prefix.split("."))


@dataclass(frozen=True)
class Found:
    """A backbone: where it is, its family, and its tensors and its head's (both
    unprefixed: ``conv1.weight``, and ``0.weight`` for ``fc.0.weight``)."""

    prefix: str
    family: str
    state: State
    head: State


def _listed(found: list[tuple[str, str]]) -> str:
    return ", ".join(repr(p) for p, _ in found)


def _pick(
    found: list[tuple[str, str]], encoder: str | None, prefix: str | None, what: str
) -> tuple[str, str]:
    """The ``(prefix, family)`` in ``found`` of the backbone asked for, or a one-line
    ``LayoutError``."""
    kind = "encoders"
    if encoder is not None and not (prefix is not None and len(found) == 1 and encoder == "query"):
        side = [(p, f) for p, f in found if is_key_path(p) == (encoder == "key")]
        if not side and encoder == "query":
            raise LayoutError(
                f"{what} holds only a key encoder, at {_listed(found)}: pass --encoder key "
                "(encoder='key')"
            )
        if not side:
            its = (
                f"its backbone at {_listed(found)} is not"
                if len(found) == 1
                else f"none of its backbones, at {_listed(found)}, is"
            )
            raise LayoutError(
                f"{what} holds no key encoder: {its} named as one (a path with key_encoder, "
                "encoder_k or momentum); to take one anyway, name it with --prefix (prefix=) "
                "and leave out --encoder key"
            )
        found, kind = side, f"{encoder} encoders"
    if len(found) > 1:
        raise LayoutError(
            f"{what} holds {len(found)} {kind}, at {_listed(found)}: choose one with --prefix "
            "(prefix=), e.g. --prefix " + found[0][0].rstrip(".")
        )
    return found[0]


def select_backbone(
    tree: Mapping[str, Any], encoder: str | None, prefix: str | None, what: str
) -> Found:
    """The backbone of the ``encoder`` (``"query"``, ``"key"``, or None: the only one) in
    ``tree``, restricted to the sub-dict ``prefix`` (a dotted path) when given."""
    tensors, others = flatten(tree)
    found = [(p, f) for p, f in find_backbones(tensors) if SHADOW not in p.split(".")]
    every = [p for p, _ in found]
    if not found:
        sample = ", ".join(list(tensors)[:4]) or "no tensors at all"
        expected = "; ".join(f"{f}: {', '.join(a)}" for f, (a, _) in FAMILIES.items())
        raise LayoutError(
            f"{what} holds no backbone: expected the keys of a ResNet or ViT encoder "
            f"({expected}), found {len(tensors)} tensors ({sample}, ...); only ResNets and "
            "ViTs convert (the example scripts' small_cnn does not; their linear_eval.py "
            "evaluates its checkpoints as saved)"
        )
    if prefix is not None:
        under = prefix.strip(".")
        inside = [(p, f) for p, f in found if not under or p.startswith(under + ".")]
        if not inside:
            raise LayoutError(
                f"{what} has no backbone under prefix {prefix!r}; backbones at {_listed(found)}"
            )
        found = inside
    at, family = _pick(found, encoder, prefix, what)
    head_prefix = FAMILIES[family][1]
    nested = [p for p in every if p != at and p.startswith(at)]  # another backbone inside
    # beside a bare state dict (a backbone at the root): its top-level values, and the dicts
    # beside it (the run's flags, an optimizer's state, tensors included), are metadata
    beside = tuple(f"{k}." for k, v in tree.items() if isinstance(v, Mapping)) if not at else ()
    for name, value in others.items():
        if (
            name.startswith(at)
            and (at or "." in name)
            and not name.startswith(beside)
            and not name[len(at) :].startswith(head_prefix)
        ):
            raise LayoutError(f"{what}[{name!r}] is a {type(value).__name__}, not a tensor")
    named = {  # unprefixed
        k[len(at) :]: v
        for k, v in tensors.items()
        if k.startswith(at)
        and not any(k.startswith(p) for p in nested)
        and not k.startswith(beside)
    }
    backbone = {k: v for k, v in named.items() if not k.startswith(head_prefix)}
    head = {k[len(head_prefix) :]: v for k, v in named.items() if k.startswith(head_prefix)}
    return Found(at, family, backbone, head)


_VIT_NAMES = [  # (torchvision, timm), one per tensor family: {n} a block, {p} a parameter
    ("class_token", "cls_token"),
    ("conv_proj.{p}", "patch_embed.proj.{p}"),
    ("encoder.pos_embedding", "pos_embed"),
    ("encoder.layers.encoder_layer_{n}.ln_1.{p}", "blocks.{n}.norm1.{p}"),
    ("encoder.layers.encoder_layer_{n}.ln_2.{p}", "blocks.{n}.norm2.{p}"),
    ("encoder.layers.encoder_layer_{n}.self_attention.in_proj_{p}", "blocks.{n}.attn.qkv.{p}"),
    ("encoder.layers.encoder_layer_{n}.self_attention.out_proj.{p}", "blocks.{n}.attn.proj.{p}"),
    ("encoder.layers.encoder_layer_{n}.mlp.0.{p}", "blocks.{n}.mlp.fc1.{p}"),
    ("encoder.layers.encoder_layer_{n}.mlp.3.{p}", "blocks.{n}.mlp.fc2.{p}"),
    ("encoder.ln.{p}", "norm.{p}"),
]


def _pattern(name: str) -> str:
    """A name of ``_VIT_NAMES`` as a regular expression, ``{n}`` and ``{p}`` as groups."""
    escaped = re.escape(name)
    return escaped.replace(r"\{n\}", r"(?P<n>\d+)").replace(r"\{p\}", r"(?P<p>\w+)")


_RESNET = re.compile(
    r"(conv1|bn1|layer[1-4]\.\d+\.(conv[1-3]|bn[1-3]|downsample\.[01]))"
    r"\.(weight|bias|running_mean|running_var|num_batches_tracked)"
)


def resnet_blocks(state: State) -> dict[int, int]:
    """``{layer: blocks}``: the highest block index of each ``layerN`` present, plus one."""
    blocks: dict[int, int] = {}
    for key in state:
        if m := re.match(r"layer(\d+)\.(\d+)\.", key):
            blocks[int(m[1])] = max(blocks.get(int(m[1]), 0), int(m[2]) + 1)
    return blocks


# blocks per layer of torchvision's ResNet builders (their ResNeXts and wide ResNets alike),
# which are detectron2's depths too, by block: basic (2 convs) or bottleneck (3)
_DEPTHS = {
    2: {(2, 2, 2, 2): 18, (3, 4, 6, 3): 34},
    3: {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152},
}


def check_resnet_depth(state: State, to: str, what: str, *, in_a_file: bool) -> None:
    """Refuse what a non-strict load (detectron2's always) would start from random weights:
    for detectron2, a stem other than its 7x7 one (the CIFAR stem) or blocks per layer of no
    depth it builds; and, ``in_a_file`` (a live module loses nothing), a ResNet without
    ``layer1`` to ``layer4``. For torchvision, a file's blocks per layer of no builder warn
    (a last block lost leaves no trace; timm builds many more depths)."""
    blocks, convs = resnet_blocks(state), 3 if "layer1.0.conv3.weight" in state else 2
    if in_a_file and sorted(blocks) != [1, 2, 3, 4]:
        has = ", ".join(f"layer{n}" for n in sorted(blocks))
        raise LayoutError(f"{what}: a ResNet has layer1 to layer4, this one {has}")
    counts = tuple(blocks.get(n, 0) for n in (1, 2, 3, 4))
    kernel = tuple(state["conv1.weight"].shape[2:])
    depths = ", ".join(f"ResNet-{d}: {c}" for c, d in _DEPTHS[convs].items())
    if to == "detectron2" and kernel != (7, 7):
        raise LayoutError(
            f"{what}: conv1 is {kernel[0]}x{kernel[1]} (a CIFAR stem?), detectron2's ResNet "
            "stem 7x7: it would start the stem from random weights"
        )
    if to == "detectron2" and counts not in _DEPTHS[convs]:
        raise LayoutError(
            f"{what}: {counts} blocks per layer, which no detectron2 ResNet of these blocks "
            f"has ({depths}): a lost block would start from random weights"
        )
    if in_a_file and to == "torchvision" and counts not in _DEPTHS[convs]:
        warnings.warn(
            f"{what}: {counts} blocks per layer, which no torchvision ResNet builder has "
            f"({depths}): build torchvision.models.resnet.ResNet with these, or, if the model "
            "had more, a block was lost and a non-strict load starts it from random weights",
            UserWarning,
            stacklevel=4,  # the caller of backbone_state_dict
        )


def stem_note(state: State) -> str | None:
    """What a model built for a ResNet with another ``conv1`` than torchvision's 7x7 one
    needs (the weights do not say whether it has a max-pool), or None."""
    kernel = tuple(state["conv1.weight"].shape[2:])
    if kernel == (7, 7):
        return None
    return (
        f"conv1 is {kernel[0]}x{kernel[1]}, not torchvision's and timm's 7x7 (the example "
        "scripts' CIFAR stem at 32 px: 3x3, stride 1, and maxpool = nn.Identity(), which "
        "the weights cannot show): give the model you build the same stem"
    )


def missing_resnet_tensor(state: State) -> str | None:
    """The first tensor that a ResNet with ``state``'s blocks has and ``state`` lacks, or
    None. Every layer from ``layer1`` to the last one present counts its blocks from 0;
    every block has ``conv1`` to ``conv2`` (basic) or ``conv3`` (bottleneck), each with its
    norm ``bn1``...; block 0 of ``layer2`` on, and of ``layer1`` where its widths differ,
    has a ``downsample``. What one conv, norm or downsample holds (a bias; running
    statistics, which a GroupNorm has not), every one holds."""
    blocks = resnet_blocks(state)
    held: dict[str, set[str]] = {"conv": set(), "bn": set(), "downsample": set()}
    for key in state:
        if m := re.fullmatch(r"(?:layer\d+\.\d+\.)?(conv|bn)\d\.(\w+)", key):
            held[m[1]].add(m[2])
        elif m := re.fullmatch(r"layer\d+\.\d+\.downsample\.(.+)", key):
            held["downsample"].add(m[1])
    convs = 3 if any(re.match(r"layer\d+\.\d+\.conv3\.", k) for k in state) else 2
    parts = [(part, i) for i in range(1, convs + 1) for part in ("conv", "bn")]
    needed = [f"{part}1.{t}" for part in ("conv", "bn") for t in held[part]]  # the stem
    for layer in range(1, max(blocks, default=0) + 1):
        for block in range(blocks.get(layer, 1)):
            at = f"layer{layer}.{block}."
            needed += [f"{at}{part}{i}.{t}" for part, i in parts for t in held[part]]
            first, last = state.get(at + "conv1.weight"), state.get(f"{at}conv{convs}.weight")
            widths_differ = (
                first is not None and last is not None and first.shape[1] != last.shape[0]
            )
            if (block == 0 and (layer > 1 or widths_differ)) or any(
                k.startswith(at + "downsample.") for k in state
            ):
                needed += [f"{at}downsample.{t}" for t in held["downsample"] or ["0.weight"]]
    return next((k for k in needed if k not in state), None)


def resnet_to_detectron2(state: State) -> State:
    """torchvision ResNet names to detectron2's, as the MoCo authors' conversion script:
    non-``layer`` keys under ``stem.``, ``layerN`` → ``res{N+1}``, ``bnK`` → ``convK.norm``,
    ``downsample.0`` → ``shortcut``, ``downsample.1`` → ``shortcut.norm``."""
    out = {}
    for key, value in state.items():
        if not _RESNET.fullmatch(key):  # a queue or a predictor beside the backbone
            raise LayoutError(
                f"tensor {key!r} is not part of a ResNet: detectron2 has no place for it"
            )
        name = re.sub(r"bn(\d)", r"conv\1.norm", key if "layer" in key else "stem." + key)
        name = re.sub(r"layer(\d)", lambda m: f"res{int(m[1]) + 1}", name)
        name = name.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
        out[name] = value
    return out


def rename(state: State, family: str, to: str, what: str) -> State:
    """``state``, a backbone of ``family``, named as ``to`` names it (the same tensors):
    a ResNet for torchvision, timm (torchvision's names) or detectron2, a ViT for
    torchvision or timm. A timm ViT without biases in the attention's input projection
    (``qkv_bias=False``) gets zero biases for torchvision's, which compute the same."""
    if family == "resnet":
        if lost := missing_resnet_tensor(state):
            raise LayoutError(
                f"{what}: tensor {lost!r} is missing (a ResNet of these blocks has it)"
            )
        return resnet_to_detectron2(state) if to == "detectron2" else dict(state)
    if family == f"vit_{to}":
        return dict(state)
    state = dict(state)
    weights = [k for k in state if k.endswith(".attn.qkv.weight")]
    biases = [k.removesuffix("weight") + "bias" for k in weights]
    if all(b not in state for b in biases):  # qkv_bias=False
        state |= {
            b: state[w].new_zeros(state[w].shape[0]) for w, b in zip(weights, biases, strict=True)
        }
    elif missing := [b for b in biases if b not in state]:  # not a zero: a lost tensor
        raise LayoutError(f"{what}: tensor {missing[0]!r} is missing (other blocks have theirs)")
    out = {}
    for key, value in state.items():
        for row in _VIT_NAMES:
            source, target = row if to == "timm" else row[::-1]
            if (m := re.fullmatch(_pattern(source), key)) is not None:
                out[target.format(**m.groupdict())] = value
                break
        else:
            raise LayoutError(f"{what}: tensor {key!r} has no counterpart in a {to} ViT")
    return out
