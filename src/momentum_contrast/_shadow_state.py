"""Bookkeeping of the ``ema_dtype`` copies (private): which side was written since the
last update, the dtype rule, and re-laying a copy out like its key (FSDP2)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from momentum_contrast._dtensor import is_dtensor, layout, local

__all__ = ["Stamps", "check_ema_dtype", "relaid"]


def check_ema_dtype(ema_dtype: torch.dtype, name: str, dtype: torch.dtype) -> None:
    """``ema_dtype`` must hold every value of ``dtype`` at least as precisely (float16
    copies of bfloat16 weights would turn 1e5 into inf)."""
    if not dtype.is_floating_point:
        return
    wide, narrow = torch.finfo(ema_dtype), torch.finfo(dtype)
    if wide.eps > narrow.eps or wide.max < narrow.max or wide.tiny > narrow.tiny:
        raise ValueError(
            f"ema_dtype {ema_dtype} has less range or precision than parameter {name!r} "
            f"({dtype}); use torch.float32 (or torch.float64 for float64 parameters)"
        )


@dataclass
class _Stamp:
    key_id: int
    key_version: int
    key_ptr: int
    key_dtype: torch.dtype
    key_device: torch.device
    shadow_id: int
    shadow_version: int


def _ptr(t: torch.Tensor) -> int:
    if torch.compiler.is_compiling() or is_dtensor(t) or t.device.type == "meta":
        return 0  # FSDP2 may re-pad a shard into new memory: its version says enough
    return t.data_ptr()


class Stamps:
    """What the last update left of each key parameter and its copy, read on the host.

    A key counts as written when it is another tensor object, its version counter moved,
    or its memory changed without a change of dtype or device (``p.data = other``); a
    cast or move of the module (``.to``) is not a write. A copy counts as written when it
    is another object or its version moved, except for the moves [`moved`][] records.
    """

    def __init__(self) -> None:
        self._stamps: dict[str, _Stamp] = {}

    def record(
        self,
        names: Sequence[str],
        keys: Mapping[str, torch.Tensor],
        shadow: Callable[[str], torch.Tensor],
    ) -> None:
        for name in names:
            k, s = keys[name], shadow(name)
            self._stamps[name] = _Stamp(
                id(k), k._version, _ptr(k), k.dtype, k.device, id(s), s._version
            )

    def moved(self, names: Sequence[str], shadow: Callable[[str], torch.Tensor]) -> None:
        for name in names:
            stamp, s = self._stamps.get(name), shadow(name)
            if stamp is not None:
                stamp.shadow_id, stamp.shadow_version = id(s), s._version

    def written(self, name: str, key: torch.Tensor, shadow: torch.Tensor) -> tuple[bool, bool]:
        """``(key written, copy written)`` since the last record."""
        s = self._stamps.get(name)
        if s is None:
            return True, False
        key_written = (
            s.key_id != id(key)
            or s.key_version != key._version
            or (s.key_ptr != _ptr(key) and (s.key_dtype, s.key_device) == (key.dtype, key.device))
        )
        shadow_written = s.shadow_id != id(shadow) or s.shadow_version != shadow._version
        return key_written, shadow_written


def relaid(old: torch.Tensor, key: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
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
