"""Higher-precision copies of low-precision key weights, which receive the EMA (private).

With bfloat16 weights and ``m = 0.999`` the step ``(1 - m) * (online - key)`` is below
half a unit in the last place of ``key`` for almost every weight (bfloat16 has 8
significant bits), so a bfloat16 moving average rounds back to where it was and
stalls. [`ShadowWeights`][] keeps a copy in ``ema_dtype`` (float32) of every key
parameter less precise than that; the average runs on the copies, and the key weights
are their rounding (``key.copy_(shadow)``), so the key encoder still computes in the
model's dtype.

The copies never go stale: before every update each copy is reconciled with its key
elementwise, on the device with fused multi-tensor ops (no host read): where the key no
longer equals the rounded copy (a load, a reshard, FSDP2 re-padding its shard, an
in-place edit, even a write through ``.data``, which no version counter sees), the copy
takes the key's value; elsewhere it keeps its extra precision (so loading a checkpoint
that holds both is exact). A copy whose layout no longer matches its key (a key encoder sharded by
``fully_shard`` after construction, or moved) is re-laid out the same way.
"""

from __future__ import annotations

import torch
from torch import nn

from momentum_contrast._dtensor import is_dtensor, layout, local
from momentum_contrast._ema import Weight, _chunks, lerp_
from momentum_contrast._pairing import TensorPairs

__all__ = ["ShadowWeights", "buffer_name", "needs_shadow"]

# Per (device, dtype) group of shadowed parameters: key, shadow and online local tensors.
ShadowGroup = tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]


def needs_shadow(dtype: torch.dtype, ema_dtype: torch.dtype) -> bool:
    """A floating dtype less precise than ``ema_dtype`` (bfloat16 or float16 under float32)."""
    return dtype.is_floating_point and torch.finfo(dtype).eps > torch.finfo(ema_dtype).eps


def buffer_name(name: str) -> str:
    """Buffer names may not contain ``.``: ``blocks.0.weight`` is kept as ``blocks/0/weight``."""
    return name.replace(".", "/")


def _relaid(old: torch.Tensor, key: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``old`` in ``key``'s layout when that is lossless, else ``key`` in ``dtype``."""
    same_global = old.shape == key.shape and old.dtype == dtype
    if same_global and not is_dtensor(old) and not is_dtensor(key):
        return old.to(key.device)
    if same_global and not is_dtensor(old) and is_dtensor(key):
        from torch.distributed.tensor import distribute_tensor

        mesh, placements = layout(key) or (None, ())
        # every rank holds the whole copy: keep this rank's slice, no communication
        moved = distribute_tensor(old.to(key.device), mesh, placements, src_data_rank=None)
        if local(moved).shape == local(key).shape:
            return moved
    return torch.empty_like(key, dtype=dtype).copy_(key.detach())


def reconcile_(keys: list[torch.Tensor], shadows: list[torch.Tensor]) -> None:
    """Where a key weight is no longer its copy rounded (anything wrote it: a load, a
    reshard, an in-place edit, a write through ``.data`` that no version counter sees),
    the copy takes the key's value; elsewhere it keeps its extra precision. On the device,
    every update, with fused multi-tensor ops (``shadow = lerp(shadow, key, changed)``)."""
    if torch.compiler.is_compiling():
        for key, shadow in zip(keys, shadows, strict=True):
            shadow.copy_(torch.where(shadow.to(key.dtype) == key, shadow, key.to(shadow.dtype)))
        return
    for ks, ss in _chunks(keys, shadows):
        rounded = [torch.empty_like(k) for k in ks]
        torch._foreach_copy_(rounded, ss)  # round(shadow), in the keys' dtype
        changed = [torch.empty_like(s) for s in ss]
        torch._foreach_copy_(changed, ks)  # key, exactly, in the copies' dtype
        wide = [torch.empty_like(s) for s in ss]
        torch._foreach_copy_(wide, rounded)
        torch._foreach_sub_(changed, wide)  # key - round(shadow): 0 where untouched
        torch._foreach_abs_(changed)
        torch._foreach_sign_(changed)  # 1 where written, else 0
        torch._foreach_copy_(wide, ks)
        torch._foreach_lerp_(ss, wide, changed)  # shadow, or the key where written


class ShadowWeights(nn.Module):
    """``ema_dtype`` copies of the key encoder's less precise parameters (state_dict
    ``ema_shadow.<name with / for .>``).

    Args:
        dtype: the precision of the average (``ema_dtype``).
        named_keys: ``(name, parameter)`` of the key encoder.
    """

    def __init__(self, dtype: torch.dtype, named_keys: list[tuple[str, torch.Tensor]]) -> None:
        super().__init__()
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"ema_dtype must be None or a floating torch.dtype, got {dtype!r}")
        self.dtype = dtype
        for name, p in named_keys:
            if needs_shadow(p.dtype, dtype):
                self.register_buffer(buffer_name(name), p.detach().to(dtype).clone())
        self._pairs: TensorPairs | None = None
        self._groups: list[ShadowGroup] = []
        self._others: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
        self._seen: list[tuple[str, torch.Tensor]] = []  # (buffer name, shadow object)

    def update_(self, pairs: TensorPairs, weight: Weight) -> None:
        """The average on the copies (the other parameters directly), then the keys."""
        shadowed, others = self.prepare(pairs)
        for keys, onlines in others:
            lerp_(keys, onlines, weight)
        for keys, shadows, onlines in shadowed:
            lerp_(shadows, onlines, weight, cast=True)
            torch._foreach_copy_(keys, shadows)  # the key weights: the copies rounded

    def prepare(
        self, pairs: TensorPairs
    ) -> tuple[list[ShadowGroup], list[tuple[list[torch.Tensor], list[torch.Tensor]]]]:
        """``(shadowed groups, other groups)`` for this update, every copy reconciled."""
        if self._pairs is not pairs or any(self._buffers.get(n) is not t for n, t in self._seen):
            self._build(pairs)
        for keys, shadows, _ in self._groups:
            reconcile_(keys, shadows)
        return self._groups, self._others

    def _build(self, pairs: TensorPairs) -> None:
        """Split the pairing into shadowed and plain parameters; re-lay out the copies."""
        key_of = dict(zip(pairs.key_names, pairs.key_seen, strict=True))
        self._groups, self._others, self._seen = [], [], []
        for (keys, onlines), names in zip(pairs.groups, pairs.group_names, strict=True):
            if not needs_shadow(keys[0].dtype, self.dtype):
                self._others.append((keys, onlines))
                continue
            shadows = []
            for name in names:
                bname, key = buffer_name(name), key_of[name]
                old = self._buffers.get(bname)
                if old is not None and old.dtype != self.dtype:
                    raise ValueError(
                        f"MomentumEncoder: ema_shadow.{bname} has dtype {old.dtype}, expected "
                        f"ema_dtype {self.dtype}; convert the key encoder alone "
                        "(.key_encoder.to(dtype)), not the MomentumEncoder"
                    )
                if (
                    old is None
                    or layout(old) != layout(key)
                    or local(old).shape != (local(key).shape)
                    or local(old).device != local(key).device
                ):
                    self._buffers[bname] = _relaid(old if old is not None else key, key, self.dtype)
                shadows.append(local(self._buffers[bname]))  # type: ignore[arg-type]
                self._seen.append((bname, self._buffers[bname]))  # type: ignore[arg-type]
            self._groups.append((keys, shadows, onlines))
        self._pairs = pairs
