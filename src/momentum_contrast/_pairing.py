"""Pair the online model's tensors with the key encoder's by name (private).

`MomentumEncoder.update` runs every step, so walking the online model every
time (about 0.3 ms of host time for a ResNet-50) would cost more than the fused
update itself. The pairing is therefore cached and trusted while the *structure
clock* has not moved: a counter bumped by PyTorch's global registration hooks
whenever any module anywhere gains or replaces a parameter, buffer or
submodule. When it has moved, the cache is checked (names, tensor identity,
shape, dtype, device) and rebuilt, with a clear error on a mismatch.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch.nn.modules import module as _module

Signature = tuple[torch.Size, torch.dtype, torch.device]


_clock = [0]
_clock_started = False


def _tick(*args: object) -> None:
    _clock[0] += 1


def structure_clock() -> int:
    """Number of parameter/buffer/submodule registrations seen in this process."""
    global _clock_started
    if not _clock_started:
        _module.register_module_parameter_registration_hook(_tick)
        _module.register_module_buffer_registration_hook(_tick)
        _module.register_module_module_registration_hook(_tick)
        _clock_started = True
    return _clock[0]


def signature(t: torch.Tensor) -> Signature:
    return (t.shape, t.dtype, t.device)


@dataclass
class TensorPairs:
    """Online and key tensors matched by name, grouped by (device, dtype)."""

    names: tuple[str, ...]
    online: tuple[torch.Tensor, ...]
    key: tuple[torch.Tensor, ...]
    key_signatures: list[Signature]
    clock: int = -1  # structure_clock() when last validated
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
