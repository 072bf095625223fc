"""The momentum (key) encoder: an exponential moving average of the online model."""

from __future__ import annotations

import copy
import math
from typing import Any, Literal

import torch
from torch import nn

from momentum_contrast._checks import check_choice, check_real, check_unit_interval
from momentum_contrast._pairing import TensorPairs, pair_by_name

__all__ = ["BufferMode", "MomentumEncoder", "cosine_momentum", "unwrap_model"]

BufferMode = Literal["own", "copy", "ema"]
"""What [`MomentumEncoder`][] does with the online model's buffers (``buffers=``).

``"own"``: the key encoder keeps and updates its own buffers in its forward (the
papers' reference: BatchNorm statistics of the key encoder are its own); ``"copy"``:
buffers are copied from the online model at every update; ``"ema"``: floating-point
buffers are averaged like parameters (integer buffers, such as BatchNorm's
``num_batches_tracked``, are always copied, never averaged).

Examples:
    >>> from typing import get_args
    >>> from momentum_contrast.encoder import BufferMode
    >>> get_args(BufferMode)
    ('own', 'copy', 'ema')
"""
_BUFFER_MODES = ("own", "copy", "ema")


def _lerp_(keys: list[torch.Tensor], onlines: list[torch.Tensor], weight: float) -> None:
    """``key += weight * (online - key)`` for every pair: one fused ``_foreach_lerp_``
    eagerly. Under ``torch.compile`` the same per tensor, which the compiler fuses and
    which keeps a weight that changes every step a graph input (the foreach op's scalar
    argument would be specialised, recompiling at every new momentum)."""
    if torch.compiler.is_compiling():
        for key, online in zip(keys, onlines, strict=True):
            key.add_((online - key) * weight)
    else:
        torch._foreach_lerp_(keys, onlines, weight)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip ``DataParallel``/``DistributedDataParallel`` (``.module``) and
    ``torch.compile`` (``._orig_mod``) wrappers, in any nesting.

    Args:
        model: a module, possibly wrapped.

    Returns:
        The innermost module, the one whose parameters the wrappers share.

    Examples:
        >>> from torch import nn
        >>> from momentum_contrast.encoder import unwrap_model
        >>> net = nn.Linear(4, 2)
        >>> unwrap_model(nn.DataParallel(net)) is net
        True
    """
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(inner := getattr(model, "_orig_mod", None), nn.Module):
            model = inner  # torch.compile's OptimizedModule
        else:
            return model


class MomentumEncoder(nn.Module):
    """Key encoder of MoCo: a frozen copy of ``online`` updated as a moving average.

    After every optimiser step call [`update`][], which does, in place and for
    every parameter ``key = m * key + (1 - m) * online``, as one fused
    multi-tensor ``torch._foreach_lerp_`` per device/dtype group. Parameters are
    paired by name. Nothing can leave the key encoder silently stale: every
    update first checks, on the host, that both models still hold the paired
    tensor objects with the same shape, dtype and device. A replaced or reloaded
    tensor on either side (``load_state_dict(assign=True)``, a swapped submodule, a
    new ``.key_encoder`` or ``.online``) is re-paired by name; a real mismatch (a
    parameter added, renamed or reshaped, one side moved alone) raises a
    ``ValueError`` naming it, instead of averaging the wrong tensors. The check
    reads no tensor value (no host-device synchronisation), so an update is still
    one fused op per group plus a short walk of both models, and is safe to
    capture in a CUDA graph.

    ``online`` is kept as a plain reference (``.online``), not a submodule, so
    ``state_dict()``, ``parameters()`` and ``.to()`` concern the key encoder only.

    Args:
        online: the query encoder being trained (any ``nn.Module``). ``DataParallel``,
            ``DistributedDataParallel`` and ``torch.compile`` wrappers are unwrapped.
        momentum: default ``m`` in ``[0, 1]``; 0.999 as MoCo v1/v2 (v3 uses 0.99
            with [`cosine_momentum`][]).
        buffers: what happens to buffers (BatchNorm running statistics) on update.
            ``"own"`` (default, as the papers): the key encoder keeps its own,
            updated by its own forward passes. ``"copy"``: copied from the online
            model. ``"ema"``: floating-point buffers averaged like parameters.
            Integer buffers (``num_batches_tracked``) are copied, never averaged.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from momentum_contrast import MomentumEncoder
        >>> online = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 4))
        >>> key_encoder = MomentumEncoder(online, momentum=0.99)
        >>> x = torch.randn(32, 8)
        >>> keys = key_encoder(x)  # (32, 4), computed without autograd
        >>> keys.shape, keys.requires_grad
        (torch.Size([32, 4]), False)
        >>> key_encoder.update()  # after optimizer.step()
    """

    def __init__(
        self, online: nn.Module, momentum: float = 0.999, *, buffers: BufferMode = "own"
    ) -> None:
        super().__init__()
        if not isinstance(online, nn.Module):
            raise TypeError(f"online must be an nn.Module, got {type(online).__name__}")
        self.momentum = check_unit_interval("momentum", momentum)
        self.buffers_mode: BufferMode = check_choice("buffers", buffers, _BUFFER_MODES)  # type: ignore[assignment]
        base = unwrap_model(online)
        self.__dict__["_online"] = base  # a reference, not a submodule
        self.key_encoder = copy.deepcopy(base)
        for p in self.key_encoder.parameters():
            p.requires_grad_(False)
            p.grad = None
        self._param_pairs: TensorPairs | None = None
        self._buffer_pairs: TensorPairs | None = None

    @property
    def online(self) -> nn.Module:
        """The (unwrapped) online model whose weights the key encoder follows.

        Assigning a new model re-pairs it with the key encoder by name and raises
        ``ValueError`` if the two no longer match (the new model is never registered
        as a submodule, so ``state_dict()`` still holds the key encoder only).
        """
        online: nn.Module = self.__dict__["_online"]
        return online

    @online.setter
    def online(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"online must be an nn.Module, got {type(model).__name__}")
        base = unwrap_model(model)
        previous = self.__dict__["_online"]
        self.__dict__["_online"] = base
        try:
            self._param_pairs = self._buffer_pairs = None
            self._pairs("parameter")
            if self.buffers_mode != "own":
                self._pairs("buffer")
        except ValueError:
            self.__dict__["_online"] = previous
            self._param_pairs = self._buffer_pairs = None
            raise

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "online":  # nn.Module.__setattr__ would register it as a submodule
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the key encoder under ``torch.no_grad()`` (same signature as ``online``)."""
        with torch.no_grad():
            return self.key_encoder(*args, **kwargs)

    @torch.no_grad()
    def update(self, momentum: float | None = None) -> None:
        """One in-place step ``key = m * key + (1 - m) * online`` on every parameter.

        Both models are checked first (host metadata only, no device read): if either
        side's tensors were replaced, moved or reshaped since the last update, the
        pairing is rebuilt by name, or a ``ValueError`` names what no longer matches.

        Args:
            momentum: ``m`` in ``[0, 1]`` for this step; ``None`` uses ``self.momentum``.
                ``1`` leaves the key unchanged, ``0`` copies the online weights.
        """
        m = self.momentum if momentum is None else check_unit_interval("momentum", momentum)
        for keys, onlines in self._pairs("parameter").groups:
            _lerp_(keys, onlines, 1.0 - m)  # key += (1-m) * (online - key)
        if self.buffers_mode == "own":
            return
        bufs = self._pairs("buffer")
        for keys, onlines in bufs.other_groups:
            torch._foreach_copy_(keys, onlines)
        for keys, onlines in bufs.float_groups:
            if self.buffers_mode == "ema":
                _lerp_(keys, onlines, 1.0 - m)
            else:
                torch._foreach_copy_(keys, onlines)

    def _pairs(self, kind: str) -> TensorPairs:
        """The (cached) pairing of ``kind`` tensors, validated against both models."""
        params = kind == "parameter"
        cached = self._param_pairs if params else self._buffer_pairs
        online_named = list(
            self.online.named_parameters() if params else self.online.named_buffers()
        )
        key_named = list(
            self.key_encoder.named_parameters() if params else self.key_encoder.named_buffers()
        )
        if cached is not None and cached.still_valid(online_named, key_named):
            return cached
        pairs = pair_by_name(kind, online_named, key_named)
        if params:
            for _, p in key_named:  # a reloaded or replaced key encoder stays frozen
                p.requires_grad_(False)
            self._param_pairs = pairs
        else:
            self._buffer_pairs = pairs
        return pairs

    def extra_repr(self) -> str:
        return f"momentum={self.momentum}, buffers={self.buffers_mode!r}"


def cosine_momentum(
    step: float, total_steps: float, base: float = 0.99, final: float = 1.0
) -> float:
    """Momentum on a half-cosine from ``base`` (step 0) to ``final`` (last step).

    ``final - (final - base) * (cos(pi * step / total_steps) + 1) / 2``, the
    schedule of MoCo v3 and BYOL. ``step`` may be fractional (MoCo v3 uses
    ``epoch + i / iters_per_epoch``).

    Args:
        step: current step in ``[0, total_steps]``.
        total_steps: number of steps of the schedule, ``> 0``.
        base: momentum at step 0, in ``[0, 1]``.
        final: momentum at ``total_steps``, in ``[0, 1]``.

    Returns:
        The momentum for this step, a Python float.

    Examples:
        >>> from momentum_contrast import cosine_momentum
        >>> cosine_momentum(0, 100), cosine_momentum(50, 100), cosine_momentum(100, 100)
        (0.99, 0.995, 1.0)
    """
    total = check_real("total_steps", total_steps)
    if not total > 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    s = check_real("step", step)
    if not 0 <= s <= total:
        raise ValueError(f"step must be in [0, total_steps={total_steps}], got {step}")
    b = check_unit_interval("base", base)
    f = check_unit_interval("final", final)
    return f - (f - b) * (math.cos(math.pi * s / total) + 1.0) / 2.0
