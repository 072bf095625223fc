"""Find the query or the key encoder's backbone in a checkpoint by its content (private;
used by ``momentum_contrast.convert``).

Every nested dict of the checkpoint is flattened into dotted names (``state_dict`` →
``model`` → ``0.conv1.weight`` gives ``state_dict.model.0.conv1.weight``); a backbone
is wherever the anchor keys of a ResNet or ViT sit (``_names.FAMILIES``), at any prefix.
A backbone whose path has a part named ``key_encoder`` (a ``MomentumEncoder``'s state),
``encoder_k`` (MoCo v1/v2) or a ``_``-separated word ``momentum`` (``momentum_encoder``,
``backbone_momentum``) is a key encoder; any other is a query encoder. The float32
``ema_shadow`` copy in a 0.3.0 ``MomentumEncoder``'s state is not a separate encoder.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from momentum_contrast.convert._names import FAMILIES, LayoutError, State, find_backbones
from momentum_contrast.convert._spec import MODEL_KEY

KEY_NAMES = ("key_encoder", "encoder_k")
SHADOW = "ema_shadow"  # 0.3.0's float32 copies of the key weights


def is_key_path(prefix: str) -> bool:
    """Whether a backbone at ``prefix`` is named as a key (momentum) encoder."""
    return any(part in KEY_NAMES or "momentum" in part.split("_") for part in prefix.split("."))


def flatten(tree: Mapping[str, Any]) -> tuple[State, dict[str, Any]]:
    """``(tensors, other values)`` of every nested dict, keyed by dotted names; entries
    with keys that are not strings (an optimizer's per-parameter state) and a converted
    file's ``"__model__"`` record are left out."""
    tensors: State = {}
    others: dict[str, Any] = {}

    def walk(mapping: Mapping[Any, Any], prefix: str) -> None:
        for key, value in mapping.items():
            if not isinstance(key, str) or key == MODEL_KEY:  # a converted file's record
                continue
            if isinstance(value, torch.Tensor):
                tensors[prefix + key] = value
            elif isinstance(value, Mapping):
                walk(value, f"{prefix}{key}.")
            else:
                others[prefix + key] = value

    walk(tree, "")
    return tensors, others


@dataclass(frozen=True)
class Found:
    """A backbone: where it is, its family, which encoder, and its tensors (unprefixed,
    without the head)."""

    prefix: str
    family: str
    side: str
    state: State


def _listed(found: list[tuple[str, str]]) -> str:
    return ", ".join(repr(p) for p, _ in found)


def _pick(found: list[tuple[str, str]], encoder: str | None, prefix: str | None, what: str) -> int:
    """The index in ``found`` of the backbone asked for, or a one-line ``LayoutError``."""
    if encoder is None or (prefix is not None and len(found) == 1 and encoder == "query"):
        if len(found) == 1:
            return 0
        return _ambiguous(found, "encoders", what)
    side = [i for i, (p, _) in enumerate(found) if is_key_path(p) == (encoder == "key")]
    if len(side) == 1:
        return side[0]
    if len(side) > 1:
        return _ambiguous([found[i] for i in side], f"{encoder} encoders", what)
    if encoder == "key":
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
    raise LayoutError(
        f"{what} holds only a key encoder, at {_listed(found)}: pass --encoder key (encoder='key')"
    )


def _ambiguous(found: list[tuple[str, str]], kind: str, what: str) -> int:
    raise LayoutError(
        f"{what} holds {len(found)} {kind}, at {_listed(found)}: choose one with --prefix "
        "(prefix=), e.g. --prefix " + found[0][0].rstrip(".")
    )


def select_backbone(
    tree: Mapping[str, Any], encoder: str | None, prefix: str | None, what: str
) -> Found:
    """The backbone of the ``encoder`` (``"query"``, ``"key"``, or None: the only one) in
    ``tree``, restricted to the sub-dict ``prefix`` (a dotted path) when given."""
    tensors, others = flatten(tree)
    found = [(p, f) for p, f in find_backbones(tensors) if SHADOW not in p.split(".")]
    if not found:
        sample = ", ".join(list(tensors)[:4]) or "no tensors at all"
        expected = "; ".join(f"{f}: {', '.join(a)}" for f, (a, _) in FAMILIES.items())
        raise LayoutError(
            f"{what} holds no backbone: expected the keys of a ResNet or ViT encoder "
            f"({expected}), found {len(tensors)} tensors ({sample}, ...)"
        )
    if prefix is not None:
        under = prefix.strip(".")
        inside = [(p, f) for p, f in found if not under or p.startswith(under + ".")]
        if not inside:
            raise LayoutError(
                f"{what} has no backbone under prefix {prefix!r}; backbones at {_listed(found)}"
            )
        found = inside
    at, family = found[_pick(found, encoder, prefix, what)]
    head = FAMILIES[family][1]
    state: State = {}
    for name, value in tensors.items():
        if name.startswith(at) and not name[len(at) :].startswith(head):
            state[name[len(at) :]] = value
    for name, value in others.items():
        if name.startswith(at) and not name[len(at) :].startswith(head):
            raise LayoutError(f"{what}[{name!r}] is a {type(value).__name__}, not a tensor")
    return Found(at, family, "key" if is_key_path(at) else "query", state)
