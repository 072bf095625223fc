"""Bookkeeping of the ``ema_dtype`` copies (private): which side was written since the
last update, the dtype rule, and re-laying a copy out like its key (FSDP2)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef

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


Snapshot = tuple[tuple[int, ...], ...]


def _storage(t: torch.Tensor) -> torch.UntypedStorage | None:
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError, TypeError):  # a subclass without storage
        return None


def _weak(storage: torch.UntypedStorage) -> StorageWeakRef:
    return StorageWeakRef(storage)  # type: ignore[no-untyped-call]


def _memory(t: torch.Tensor) -> int:
    """The identity of ``t``'s storage (not its address: freed memory is soon reused)."""
    storage = _storage(t)
    return t.data_ptr() if storage is None else storage._cdata


def _snapshot(keys: Sequence[torch.Tensor], shadows: Sequence[torch.Tensor]) -> Snapshot:
    # FSDP2 may re-pad a shard into new memory: a DTensor's version says enough
    sharded = bool(keys) and is_dtensor(keys[0])  # the pairing never mixes the two
    return (
        tuple(map(id, keys)),
        tuple(k._version for k in keys),
        () if sharded else tuple(map(_memory, keys)),
        tuple(map(id, shadows)),
        tuple(s._version for s in shadows),
    )


class Stamps:
    """What the last update left of the key parameters and their copies, read on the host
    (ids, version counters, storage identities: no tensor value), compared in one tuple
    comparison when nothing was written.

    A key counts as written when it is another tensor object, its version counter moved,
    or its storage changed (``p.data = other``, or a cast or move of the module, which the
    elementwise reconcile then tells apart). Storages are told apart by identity, and the
    recorded ones are held by weak references, so a new storage can never pass for the
    recorded one (an address can: ``p.data = x`` then a cast may land the cast exactly where
    the freed original lay). A copy counts as written when it is another object or its
    version moved, except for the moves [`moved`][] records.
    """

    def __init__(self) -> None:
        self.last: Snapshot | None = None
        # weak references to the recorded storages: while one is held, no new storage
        # can take its identity (a freed storage's identity is reserved, not reused)
        self._held: list[StorageWeakRef | None] = []
        self._held_memory: tuple[int, ...] = ()
        # the keys' dtypes at the record: a key cast since then (bf16 -> fp16) is still its
        # copy's rounding to this dtype, then cast, not the direct rounding to its new one
        self.key_dtypes: tuple[torch.dtype, ...] = ()

    def __getstate__(self) -> dict[str, Any]:
        # a copy (deepcopy, pickle) compares against nothing: its first update reconciles
        return {"last": None, "_held": [], "_held_memory": (), "key_dtypes": ()}

    def record(self, keys: Sequence[torch.Tensor], shadows: Sequence[torch.Tensor]) -> None:
        self.last = _snapshot(keys, shadows)
        self.key_dtypes = tuple(k.dtype for k in keys)
        if self.last[2] != self._held_memory:  # after a cast, a move, ``p.data = ...``
            held = [None if s is None else _weak(s) for s in map(_storage, keys)]
            self._held = held
            self._held_memory = self.last[2]

    def moved(self, shadows: Sequence[torch.Tensor]) -> None:
        """The copies were moved (not written) by a cast or move of the module."""
        if self.last is not None:
            ids, versions = tuple(map(id, shadows)), tuple(s._version for s in shadows)
            self.last = (*self.last[:3], ids, versions)

    def written(
        self, keys: Sequence[torch.Tensor], shadows: Sequence[torch.Tensor]
    ) -> list[tuple[int, bool, bool]]:
        """``(index, key written, copy written)`` of each pair written since the record."""
        now, last = _snapshot(keys, shadows), self.last
        if now == last:
            return []
        if last is None or len(last[0]) != len(now[0]):
            return [(i, True, False) for i in range(len(keys))]
        ptrs = bool(last[2]) and bool(now[2])
        out = []
        for i in range(len(keys)):
            # new memory: a cast or move of the module, or a ``p.data = ...`` write (before
            # or after one): counted as a write, whose elementwise reconcile keeps the copy
            # wherever the key is still its rounding (all of it after a plain cast or move)
            key_written = (
                last[0][i] != now[0][i]
                or last[1][i] != now[1][i]
                or (ptrs and last[2][i] != now[2][i])
            )
            shadow_written = last[3][i] != now[3][i] or last[4][i] != now[4][i]
            if key_written or shadow_written:
                out.append((i, key_written, shadow_written))
        return out


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
