"""Higher-precision copies of the key weights, which receive the EMA (private).

With bfloat16 weights and ``m = 0.999`` the step ``(1 - m) * (online - key)`` is below
half a unit in the last place of ``key`` for almost every weight (bfloat16 has 8
significant bits), so a bfloat16 moving average rounds back to where it was and
stalls. [`ShadowWeights`][] keeps an ``ema_dtype`` (float32) copy of every floating key
parameter, from construction on; the average runs on the copies and the key weights are
their rounding (``key.copy_(shadow)``), so the key encoder computes in the model's dtype.

The copies are a tree of modules that mirrors the key encoder's names, so the state-dict
keys are plain (``ema_shadow.0.weight``), and they keep ``ema_dtype`` through any cast of
a parent module (``.to(torch.bfloat16)``, ``.half()``: Lightning's ``bf16-true``) while
following its device moves.

The copies never go stale, and nothing a compiler may rewrite decides it: no value is
compared in a training step. On the host, each key parameter's version counter (bumped by
every in-place write: ``copy_``, ``load_state_dict``, an optimizer), its identity and its
memory are compared with what the last update left (:class:`Stamps`). A key written outside
``update()`` gives its value to its copy; a copy written alone (loaded) gives its rounding to
the key. A load of the whole ``MomentumEncoder`` is reconciled by its load hooks. Only a
write through ``p.data`` *in place* escapes every counter: assign ``p.data = ...`` or write
under ``torch.no_grad()`` instead.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from momentum_contrast._casts import apply_keeping_dtype
from momentum_contrast._dtensor import is_dtensor, layout, local
from momentum_contrast._ema import Weight, lerp_
from momentum_contrast._pairing import TensorPairs
from momentum_contrast._shadow_state import Stamps, check_ema_dtype, relaid

__all__ = ["ShadowWeights"]


def _host_only(cls: type[ShadowWeights]) -> None:
    """Make ``sync`` and ``stamp`` never compiled: under ``torch.compile`` a graph break
    runs them eagerly, on the host. Done at the first construction, not at import, since
    ``torch.compiler.disable`` imports Dynamo (and sympy), which plain use never needs."""
    if not cls.__dict__.get("_host_only", False):
        cls._host_only = True
        for name in ("sync", "stamp"):
            fn = getattr(cls, "_" + name)
            reason = "host-side checks of the ema_dtype copies"
            try:
                host_only = torch.compiler.disable(fn, reason=reason)  # type: ignore[no-untyped-call]
            except TypeError:  # torch 2.7 and older take no reason
                host_only = torch.compiler.disable(fn)  # type: ignore[no-untyped-call]
            setattr(cls, name, host_only)


# Per (device, dtype) group of shadowed parameters: key, shadow and online local tensors.
ShadowGroup = tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]


class _Level(nn.Module):
    """One level of the mirror tree; its buffers keep their dtype through module casts."""

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:
        if recurse:
            for child in self.children():
                child._apply(fn)  # type: ignore[no-untyped-call]
        apply_keeping_dtype(self._buffers, fn)  # a cast: follow the device only
        return self


class ShadowWeights(_Level):
    """``ema_dtype`` copies of every floating key parameter (``ema_shadow.<name>``).

    Args:
        dtype: the precision of the average (``ema_dtype``).
        named_keys: ``(name, parameter)`` of the key encoder.
    """

    _host_only = False  # sync and stamp made never-compiled yet?

    def __init__(self, dtype: torch.dtype, named_keys: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().__init__()
        _host_only(type(self))
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"ema_dtype must be None or a floating torch.dtype, got {dtype!r}")
        self.dtype = dtype
        self.names: list[str] = []
        keys = []
        for name, p in named_keys:
            if p.is_floating_point():
                check_ema_dtype(dtype, name, p.dtype)
                self._level(name).register_buffer(name.rpartition(".")[2], self._widened(p))
                self.names.append(name)
                keys.append(p)
        # where each copy lives (node, buffer name): the tree never changes after this
        self._slots = [(self._level(n), n.rpartition(".")[2]) for n in self.names]
        self.stamps = Stamps()
        self.stamps.record(keys, self.shadows())
        self._pairs: TensorPairs | None = None
        self._keys: list[torch.Tensor] = []  # the pairing's key tensors, in names order
        self._built: list[torch.Tensor] = []  # the copies the groups hold
        self._groups: list[ShadowGroup] = []
        self._others: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
        # set by exclude_from_ddp: DDP no longer makes the copies rank 0's, the first
        # update does (one broadcast, once, wherever the copies are by then)
        self.broadcast_pending = False

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # type: ignore[no-untyped-call]
        _host_only(type(self))  # unpickled in a fresh process: __init__ never ran there

    def _level(self, name: str) -> nn.Module:
        node: nn.Module = self
        for part in name.split(".")[:-1]:
            if part not in node._modules:
                node.add_module(part, _Level())
            node = node._modules[part]  # type: ignore[assignment]
        return node

    def _widened(self, key: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(key, dtype=self.dtype).copy_(key.detach())

    def shadows(self) -> list[torch.Tensor]:
        """The copies, in the order of ``names`` (whatever replaced them since)."""
        return [node._buffers[leaf] for node, leaf in self._slots]  # type: ignore[misc]

    def _set(self, i: int, value: torch.Tensor) -> None:
        node, leaf = self._slots[i]
        node._buffers[leaf] = value

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:
        super()._apply(fn, recurse)
        self.stamps.moved(self.shadows())  # a move writes nothing
        return self

    def update_(self, groups: list[ShadowGroup], weight: Weight) -> None:
        """The average on the copies, then the keys: their rounding (device work only)."""
        for keys, shadows, onlines in groups:
            lerp_(shadows, onlines, weight, cast=True)
            torch._foreach_copy_(keys, shadows)

    def _sync(self, pairs: TensorPairs) -> list[ShadowGroup]:
        """The groups of this update, each copy made current first (host checks; a copy
        is written only after a write outside ``update()``). Never compiled."""
        shadows = self.shadows()
        if self._pairs is not pairs or any(map(operator.is_not, shadows, self._built)):
            self._build(pairs)
            shadows = self.shadows()
        if self.broadcast_pending:
            self._take_rank0_copies(shadows)
        recorded = self.stamps.key_dtypes
        for i, key_written, _ in self.stamps.written(self._keys, shadows):
            dtype = recorded[i] if len(recorded) == len(self._keys) else None
            self.follow(i, self._keys[i], key_written, dtype)
        return self._groups

    @torch.no_grad()
    def _take_rank0_copies(self, shadows: list[torch.Tensor]) -> None:
        """Every rank takes rank 0's copies, and its keys become their rounding (DDP made
        the key weights rank 0's when it was built, without a trace a counter would show)."""
        self.broadcast_pending = False
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        for i, shadow in enumerate(shadows):
            if not is_dtensor(shadow):  # FSDP2's copies are shards: never broadcast
                dist.broadcast(shadow, src=0)
                local(self._keys[i]).copy_(shadow)
        self.stamps.record(self._keys, shadows)

    sync = _sync  # replaced by its never-compiled form at the first construction

    def _stamp(self, pairs: TensorPairs) -> None:
        """Remember what this update left, to see outside writes at the next one."""
        self.stamps.record(self._keys, self.shadows())

    stamp = _stamp

    @torch.no_grad()
    def follow(
        self, i: int, key: torch.Tensor, key_written: bool, saved_dtype: torch.dtype | None = None
    ) -> None:
        """After an outside write to copy ``i`` or its key. A written key gives its value
        to the copy where it is no longer the copy's rounding, neither to the key's own
        dtype nor to ``saved_dtype`` then the key's (the key's dtype in a loaded checkpoint,
        or at the last update before a cast); elsewhere the copy keeps its precision. Then
        the key is the copy's rounding. Eager only (never compiled), and only after an
        outside write, so no compiler can drop the rounding it needs."""
        shadow = self.shadows()[i]
        if layout(shadow) != layout(key) or local(shadow).shape != local(key).shape:
            return  # re-laid out by _build, which keeps the values
        k, s = local(key), local(shadow)
        if key_written:
            kept = s.to(k.dtype) == k
            if saved_dtype is not None and saved_dtype != k.dtype:
                kept |= s.to(saved_dtype).to(k.dtype) == k
            s.copy_(torch.where(kept, s, k.to(s.dtype)))
        k.copy_(s)

    @torch.no_grad()
    def seed(self, i: int, key: torch.Tensor, value: torch.Tensor | None = None) -> None:
        """Copy ``i`` from ``value`` (a loaded checkpoint's key, at its own precision) or
        from its key; then the key is its rounding (a checkpoint saved without ema_dtype)."""
        shadow, source = self.shadows()[i], key if value is None else value
        same = layout(shadow) == layout(key) and local(shadow).shape == local(key).shape
        if same and (value is None or layout(value) == layout(key)):
            local(shadow).copy_(local(source))
            local(key).copy_(local(shadow))
            return
        self._set(i, self._widened(key))

    def _build(self, pairs: TensorPairs) -> None:
        """Split the pairing into groups; re-lay out the copies that no longer match."""
        key_of = dict(zip(pairs.key_names, pairs.key_seen, strict=True))
        missing = [n for n in key_of if key_of[n].is_floating_point() and n not in self.names]
        if missing:
            raise ValueError(
                f"MomentumEncoder: the key encoder has parameters without an ema_dtype copy: "
                f"{missing}; build a new MomentumEncoder after changing the model's structure"
            )
        index = {n: i for i, n in enumerate(self.names)}
        self._groups, self._others = [], []
        for (keys, onlines), names in zip(pairs.groups, pairs.group_names, strict=True):
            if not keys[0].is_floating_point():
                self._others.append((keys, onlines))
                continue
            group = []
            for name in names:
                key, old = key_of[name], self.shadows()[index[name]]
                check_ema_dtype(self.dtype, name, key.dtype)
                if old.dtype != self.dtype:
                    raise ValueError(
                        f"MomentumEncoder: ema_shadow.{name} has dtype {old.dtype}, expected "
                        f"ema_dtype {self.dtype}"
                    )
                if (
                    layout(old) != layout(key)
                    or local(old).shape != local(key).shape
                    or local(old).device != local(key).device
                ):
                    self._set(index[name], relaid(old, key, self.dtype))
                group.append(local(self.shadows()[index[name]]))
            self._groups.append((keys, group, onlines))
        self._keys = [key_of[n] for n in self.names]
        self._built = self.shadows()
        self._pairs = pairs

    @property
    def others(self) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
        """Groups of parameters without a copy (integer parameters), averaged as usual."""
        return self._others
