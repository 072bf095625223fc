"""Pair the online model's tensors with the key encoder's by name (private).

`MomentumEncoder.update` runs every step, so the pairing is cached and only
rebuilt (and re-validated) when the online model's structure changed: a
different name list, a replaced tensor object, or a tensor whose shape, dtype
or device no longer matches its key twin.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

Signature = tuple[torch.Size, torch.dtype, torch.device]


def signature(t: torch.Tensor) -> Signature:
    return (t.shape, t.dtype, t.device)


@dataclass
class TensorPairs:
    """Online and key tensors matched by name, grouped by (device, dtype)."""

    names: tuple[str, ...]
    online: tuple[torch.Tensor, ...]
    key: tuple[torch.Tensor, ...]
    key_signatures: list[Signature]
    # (key tensors, online tensors) per (device, dtype, is_floating_point) group
    groups: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = field(default_factory=list)
    float_groups: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = field(default_factory=list)
    other_groups: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = field(default_factory=list)

    def still_valid(self, online_named: Sequence[tuple[str, torch.Tensor]]) -> bool:
        """Cheap check that the cached pairing still describes ``online_named``."""
        if len(online_named) != len(self.names):
            return False
        names = tuple(n for n, _ in online_named)
        tensors = [t for _, t in online_named]
        return (
            names == self.names
            and all(map(operator.is_, tensors, self.online))
            and [signature(t) for t in tensors] == self.key_signatures
        )


def pair_by_name(
    kind: str,
    online_named: Sequence[tuple[str, torch.Tensor]],
    key_named: Sequence[tuple[str, torch.Tensor]],
) -> TensorPairs:
    """Match tensors by name; raise ``ValueError`` describing any mismatch.

    Args:
        kind: ``"parameter"`` or ``"buffer"``, used in error messages.
        online_named: ``(name, tensor)`` of the online model.
        key_named: ``(name, tensor)`` of the key encoder.
    """
    online = dict(online_named)
    key = dict(key_named)
    problems = []
    missing = [n for n in key if n not in online]
    added = [n for n in online if n not in key]
    if missing:
        problems.append(f"{kind}s missing from the online model: {missing}")
    if added:
        problems.append(f"{kind}s the key encoder does not have: {added}")
    for name in key.keys() & online.keys():
        k, o = key[name], online[name]
        for what, kv, ov in (
            ("shape", tuple(k.shape), tuple(o.shape)),
            ("dtype", k.dtype, o.dtype),
            ("device", k.device, o.device),
        ):
            if kv != ov:
                problems.append(
                    f"{kind} {name!r} has {what} {ov} online but {kv} in the key encoder"
                )
    if problems:
        raise ValueError(
            "MomentumEncoder: the online model no longer matches the key encoder; "
            + "; ".join(problems)
            + ". Move the MomentumEncoder with the model (.to(...)), or build a new "
            "MomentumEncoder after changing the model's structure."
        )
    names = tuple(n for n, _ in online_named)
    pairs = TensorPairs(
        names=names,
        online=tuple(online[n] for n in names),
        key=tuple(key[n] for n in names),
        key_signatures=[signature(key[n]) for n in names],
    )
    buckets: dict[tuple[torch.device, torch.dtype], tuple[list[torch.Tensor], list[torch.Tensor]]]
    buckets = {}
    for k, o in zip(pairs.key, pairs.online, strict=True):
        ks, os_ = buckets.setdefault((k.device, k.dtype), ([], []))
        ks.append(k)
        os_.append(o)
    pairs.groups = list(buckets.values())
    pairs.float_groups = [g for g in pairs.groups if g[0][0].is_floating_point()]
    pairs.other_groups = [g for g in pairs.groups if not g[0][0].is_floating_point()]
    return pairs
