"""Pair the online model's tensors with the key encoder's by name (private).

`MomentumEncoder.update` must never average the wrong tensors, nor keep writing to
tensors that are no longer in either model. Tensors can change behind any cache in
many ways that no hook reports: ``load_state_dict(assign=True)``, a replaced
submodule (``convert_split_batchnorm`` on the key encoder), a replaced
``.key_encoder``, ``module.to(...)`` (which swaps ``.data`` in place), FSDP2's
parameter swaps (``module._parameters[name] = ...``). So every update walks *both*
models (``named_parameters()``) and checks that each side still holds the same
names and the very tensor objects of the cached pairing, with the same shape, dtype
and device (for FSDP2's ``DTensor`` parameters: the global shape, the device mesh
and placements, and the local shard, which is what the update writes). That walk is
host work only (no device read); it costs tens to hundreds of microseconds
(``benchmarks/pieces.py`` measures it on a ResNet-50 and a ViT-B) and overlaps the
GPU. When anything differs, the pairing is rebuilt by name, and a real mismatch
raises a ``ValueError`` naming it.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from momentum_contrast._dtensor import describe_layout, is_dtensor, layout, local, reshard_fsdp
from momentum_contrast._versions import FSDP2_TORCH, require_torch

Signature = tuple[torch.Size, torch.dtype, torch.device]
Group = tuple[list[torch.Tensor], list[torch.Tensor]]


def signature(t: torch.Tensor) -> Signature:
    return (t.shape, t.dtype, t.device)


@dataclass
class TensorPairs:
    """Online and key tensors matched by name, grouped by (device, dtype).

    ``online_seen``/``key_seen`` are the two walks (in each model's own order) the
    pairing was built from, with their signatures, for [`still_valid`][].
    """

    online_names: tuple[str, ...]
    key_names: tuple[str, ...]
    online_seen: tuple[torch.Tensor, ...]
    key_seen: tuple[torch.Tensor, ...]
    online_signatures: tuple[Signature, ...]
    key_signatures: tuple[Signature, ...]
    # with DTensors only: the local shards the groups hold (to see FSDP2 re-pad a
    # shard) and the (mesh, placements) of each tensor
    online_locals: tuple[torch.Tensor, ...] = ()
    key_locals: tuple[torch.Tensor, ...] = ()
    online_layouts: tuple[object, ...] = ()
    key_layouts: tuple[object, ...] = ()
    # where each tensor's data lives: a ``.data = ...`` or ``set_`` swap keeps the tensor
    # object but not its memory, and may make one side share the other's
    online_ptrs: tuple[int, ...] = ()
    key_ptrs: tuple[int, ...] = ()
    # (key tensors, online tensors) per (device, dtype) group; local shards of DTensors
    groups: list[Group] = field(default_factory=list)
    group_names: list[list[str]] = field(default_factory=list)
    float_groups: list[Group] = field(default_factory=list)
    other_groups: list[Group] = field(default_factory=list)

    def still_valid(
        self,
        online_named: Sequence[tuple[str, torch.Tensor]],
        key_named: Sequence[tuple[str, torch.Tensor]],
    ) -> bool:
        """Both walks return the cached names and tensor objects, unchanged in
        shape, dtype and device."""
        if len(online_named) != len(self.online_seen) or len(key_named) != len(self.key_seen):
            return False
        online_names, online = zip(*online_named, strict=True) if online_named else ((), ())
        key_names, key = zip(*key_named, strict=True) if key_named else ((), ())
        return (
            online_names == self.online_names
            and key_names == self.key_names
            and all(map(operator.is_, online, self.online_seen))
            and all(map(operator.is_, key, self.key_seen))
            and tuple(map(signature, online)) == self.online_signatures
            and tuple(map(signature, key)) == self.key_signatures
            and (
                torch.compiler.is_compiling()  # Dynamo cannot compare data pointers
                or (
                    data_addresses(online, bool(self.online_locals)) == self.online_ptrs
                    and data_addresses(key, bool(self.online_locals)) == self.key_ptrs
                )
            )
            and (
                not self.online_locals  # no DTensor: the tensors are what the groups hold
                or (
                    all(map(operator.is_, map(local, online), self.online_locals))
                    and all(map(operator.is_, map(local, key), self.key_locals))
                    and tuple(map(layout, online)) == self.online_layouts
                    and tuple(map(layout, key)) == self.key_layouts
                )
            )
        )


def data_addresses(tensors: Sequence[torch.Tensor], sharded: bool) -> tuple[int, ...]:
    """Where each tensor's (local) data starts (0 without memory, as for meta tensors)."""
    if sharded:
        return tuple(local(t).data_ptr() for t in tensors)
    return tuple(t.data_ptr() for t in tensors)


def _storage(t: torch.Tensor) -> tuple[torch.device, int] | None:
    t = local(t)
    if torch.compiler.is_compiling() or t.device.type == "meta" or t.numel() == 0:
        return None
    try:
        return (t.device, int(t.untyped_storage().data_ptr()))
    except RuntimeError:  # a tensor subclass without storage of its own (TwoTensor)
        return None


def shared_memory(
    online_named: Sequence[tuple[str, torch.Tensor]],
    key_named: Sequence[tuple[str, torch.Tensor]],
) -> list[str]:
    """Names of key tensors that live in the memory of any online tensor (whatever its
    name): an average of a tensor with itself, or a key update written into the online
    model."""
    online = {_storage(t) for _, t in online_named} - {None}
    online_ids = {id(t) for _, t in online_named}
    return [n for n, t in key_named if id(t) in online_ids or _storage(t) in online]


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
    for name in sorted(key.keys() & online.keys()):
        k, o = key[name], online[name]
        for what, kv, ov in (
            ("shape", tuple(k.shape), tuple(o.shape)),
            ("dtype", k.dtype, o.dtype),
            ("device", k.device, o.device),
            ("layout", describe_layout(layout(k)), describe_layout(layout(o))),
        ):
            if kv != ov:
                problems.append(
                    f"{kind} {name!r} has {what} {ov} online but {kv} in the key encoder"
                )
    shared = shared_memory(online_named, key_named)
    if shared:
        problems.append(
            f"the key encoder shares these {kind}s' memory with the online model (an "
            f"update would average a tensor with itself or write into the online model): "
            f"{shared}"
        )
    if problems:
        raise ValueError(
            "MomentumEncoder: the online model no longer matches the key encoder; "
            + "; ".join(problems)
            + ". Move the MomentumEncoder with the model (.to(...)), shard both models "
            "alike (fully_shard with the same mesh), or build a new MomentumEncoder after "
            "changing the model's structure."
        )
    names = [n for n, _ in online_named]
    buckets: dict[tuple[torch.device, torch.dtype], Group] = {}
    bucket_names: dict[tuple[torch.device, torch.dtype], list[str]] = {}
    for name in names:
        k = local(key[name])
        ks, os_ = buckets.setdefault((k.device, k.dtype), ([], []))
        ks.append(k)
        os_.append(local(online[name]))
        bucket_names.setdefault((k.device, k.dtype), []).append(name)
    groups = list(buckets.values())
    online_seen = tuple(t for _, t in online_named)
    key_seen = tuple(t for _, t in key_named)
    sharded = any(map(is_dtensor, online_seen + key_seen))
    compiling = torch.compiler.is_compiling()  # Dynamo cannot look at data pointers
    if sharded and not compiling:
        require_torch(FSDP2_TORCH, "MomentumEncoder with FSDP2 (fully_shard) or DTensor parameters")
    return TensorPairs(
        online_names=tuple(n for n, _ in online_named),
        key_names=tuple(n for n, _ in key_named),
        online_seen=online_seen,
        key_seen=key_seen,
        online_signatures=tuple(map(signature, online_seen)),
        key_signatures=tuple(map(signature, key_seen)),
        online_locals=tuple(map(local, online_seen)) if sharded else (),
        key_locals=tuple(map(local, key_seen)) if sharded else (),
        online_layouts=tuple(map(layout, online_seen)) if sharded else (),
        key_layouts=tuple(map(layout, key_seen)) if sharded else (),
        online_ptrs=data_addresses(online_seen, sharded) if not compiling else (),
        key_ptrs=data_addresses(key_seen, sharded) if not compiling else (),
        groups=groups,
        group_names=list(bucket_names.values()),
        float_groups=[g for g in groups if g[0][0].is_floating_point()],
        other_groups=[g for g in groups if not g[0][0].is_floating_point()],
    )


def current_pairs(
    kind: str, cached: TensorPairs | None, online: torch.nn.Module, key: torch.nn.Module
) -> TensorPairs:
    """``cached`` if both models still hold its tensors, else a new pairing by name.

    FSDP2 modules left unsharded (a root after a no-grad forward) show other tensors
    than the sharded ones a pairing holds: they are resharded (only when the check
    fails, so it costs nothing without FSDP2) and the models looked at again."""
    params = kind == "parameter"

    def walk() -> tuple[list[tuple[str, torch.Tensor]], list[tuple[str, torch.Tensor]]]:
        if params:
            return list(online.named_parameters()), list(key.named_parameters())
        return list(online.named_buffers()), list(key.named_buffers())

    online_named, key_named = walk()
    if cached is not None and cached.still_valid(online_named, key_named):
        return cached
    if params and reshard_fsdp(online, key):
        online_named, key_named = walk()
        if cached is not None and cached.still_valid(online_named, key_named):
            return cached
    pairs = pair_by_name(kind, online_named, key_named)
    if params:
        for _, p in key_named:  # a reloaded or replaced key encoder stays frozen
            p.requires_grad_(False)
    return pairs
