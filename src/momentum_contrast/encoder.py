"""The momentum (key) encoder: an exponential moving average of the online model."""

from __future__ import annotations

import copy
import math
from typing import Any, Literal

import torch
from torch import nn

from momentum_contrast._checks import check_choice, check_real, check_unit_interval
from momentum_contrast._dtensor import is_fsdp2, refuse_fsdp1
from momentum_contrast._ema import check_momentum, lerp_
from momentum_contrast._pairing import TensorPairs, current_pairs
from momentum_contrast._shadow import ShadowWeights
from momentum_contrast._shadow_load import load_post_hook, load_pre_hook
from momentum_contrast._update_guard import UpdateGuard

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

    After every optimiser step call [`update`][] once (a second call with no change of
    the online weights in between warns: under gradient accumulation the momentum would
    compound to ``m**2``): ``key = m * key + (1 - m) * online``
    on every parameter, in place, one fused multi-tensor op per device/dtype group,
    parameters paired by name. Nothing can leave the key encoder silently stale: every
    update first checks, on the host (no tensor value read, so it is safe in a CUDA
    graph), that both models still hold the paired tensor objects with the same shape,
    dtype and device. A replaced or reloaded tensor on either side
    (``load_state_dict(assign=True)``, a swapped submodule, a new ``.key_encoder`` or
    ``.online``) is re-paired by name; a real mismatch (a parameter added, renamed or
    reshaped, one side moved alone) raises a ``ValueError`` naming it.

    FSDP2 (``fully_shard`` of the online model and of ``.key_encoder``, any settings):
    an update reshards the modules left unsharded (a root after a no-grad forward), so
    the next forward gathers the updated shards, and averages the local shards of the
    ``DTensor`` parameters; one side sharded and the other not, or another mesh or
    placements, raises a ``ValueError``.

    ``online`` is kept as a plain reference (``.online``), not a submodule, so
    ``state_dict()``, ``parameters()`` and ``.to()`` concern the key encoder only.
    ``copy.deepcopy`` and pickling copy the online model with it, as they copy every
    object an object refers to: the copy follows that copy. To make it follow the model
    you train, assign ``copy.online = model``.

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
        ema_dtype: ``None`` (default): every parameter is averaged in its own dtype.
            ``torch.float32``: a float32 copy of every floating key parameter, made at
            construction (``ema_shadow.<name>`` in ``state_dict``), receives the average
            and the key weights are its rounding, so keys come out in the model's dtype
            and the average does not stall below bfloat16's resolution. The copies stay
            float32 through any cast of a parent module (``.to(torch.bfloat16)``,
            Lightning's ``bf16-true``) and follow its moves; a checkpoint loads into a
            fresh encoder before or after such a cast. A key weight written outside
            [`update`][] (``load_state_dict``, ``copy_``, ``p.data = ...``) is seen by
            its version counter or memory on the host and followed (an in-place write
            through ``p.data`` or by a ``torch.distributed`` collective is not seen:
            write under ``torch.no_grad()``, or call
            ``load_state_dict(state_dict())`` after it). Under
            ``torch.compile`` those host checks run eagerly (one graph break, so not
            with ``fullgraph=True``) and the result equals eager. A dtype narrower than
            a parameter's raises ``ValueError``. Buffers (``buffers="ema"``) are averaged
            in their own dtype.

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
        >>> optimizer = torch.optim.SGD(online.parameters(), lr=0.1)
        >>> for m in (0.99, torch.tensor(0.996)):  # a float, or a 0-d tensor (CUDA graphs)
        ...     online(x).pow(2).mean().backward()
        ...     optimizer.step(); optimizer.zero_grad()
        ...     key_encoder.update(m)  # once per optimizer step, after it
        >>> bf16 = MomentumEncoder(nn.Linear(8, 4).bfloat16(), ema_dtype=torch.float32)
        >>> bf16.ema_shadow.weight.dtype, bf16.key_encoder.weight.dtype
        (torch.float32, torch.bfloat16)
    """

    def __init__(
        self,
        online: nn.Module,
        momentum: float = 0.999,
        *,
        buffers: BufferMode = "own",
        ema_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(online, nn.Module):
            raise TypeError(f"online must be an nn.Module, got {type(online).__name__}")
        refuse_fsdp1(online)
        self.momentum = check_unit_interval("momentum", momentum)
        self.buffers_mode: BufferMode = check_choice("buffers", buffers, _BUFFER_MODES)  # type: ignore[assignment]
        base = unwrap_model(online)
        self.__dict__["_online"] = base  # a reference, not a submodule
        try:
            self.key_encoder = copy.deepcopy(base)
        except (AssertionError, RuntimeError) as e:  # FSDP2 refuses deepcopy of a sharded model
            if not is_fsdp2(base):
                raise
            raise TypeError(
                "MomentumEncoder: cannot copy a model already sharded by fully_shard; build "
                "the MomentumEncoder first, then fully_shard the online model and .key_encoder"
            ) from e
        for p in self.key_encoder.parameters():
            p.requires_grad_(False)
            p.grad = None
        self.ema_dtype = ema_dtype
        if ema_dtype is not None:  # validated there
            self.ema_shadow = ShadowWeights(ema_dtype, self.key_encoder_params())
        self._register_load_state_dict_pre_hook(load_pre_hook, with_module=True)  # type: ignore[no-untyped-call]
        self.register_load_state_dict_post_hook(load_post_hook)  # type: ignore[no-untyped-call]
        self._guard = UpdateGuard()
        self._param_pairs: TensorPairs | None = None
        self._buffer_pairs: TensorPairs | None = None

    def key_encoder_params(self) -> list[tuple[str, torch.Tensor]]:
        """``(name, parameter)`` of the (unwrapped) key encoder."""
        return list(unwrap_model(self.key_encoder).named_parameters())

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
        refuse_fsdp1(model)
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
    def update(self, momentum: float | torch.Tensor | None = None) -> None:
        """One in-place step ``key = m * key + (1 - m) * online`` on every parameter.

        Both models are checked first (see the class).

        Args:
            momentum: ``m`` for this step (``None``: ``self.momentum``), a float in
                ``[0, 1]`` or a 0-d floating tensor on the parameters' device, never
                read on the host (the caller keeps it in ``[0, 1]``): fill it before
                each replay of a CUDA graph holding the update; under ``torch.compile``
                a new value does not recompile. ``1`` keeps the key, ``0`` copies.

        Examples:
            >>> import torch
            >>> from momentum_contrast import MomentumEncoder, cosine_momentum
            >>> online = torch.nn.Linear(4, 2)
            >>> encoder = MomentumEncoder(online)
            >>> m = torch.tensor(0.99)  # on the parameters' device
            >>> for step in range(3):
            ...     _ = online.weight.detach().add_(0.1)  # stands for optimizer.step()
            ...     _ = m.fill_(cosine_momentum(step, 3))  # e.g. before graph.replay()
            ...     encoder.update(m)
        """
        pairs = self._pairs("parameter")
        m: float | torch.Tensor = self.momentum
        if momentum is not None:
            m = check_momentum(momentum, {ks[0].device for ks, _ in pairs.groups})
        if not torch.compiler.is_compiling():
            self._guard.check(pairs.online_seen)  # warns once if nothing moved since the last
        weight = 1.0 - m  # key += (1 - m) * (online - key); a 0-d tensor stays on the device
        if self.ema_dtype is not None:
            shadows, compiling = self.ema_shadow, torch.compiler.is_compiling()
            # host checks, never compiled (under Dynamo: a graph break runs them eagerly)
            groups = shadows.sync(pairs) if compiling else shadows._sync(pairs)
            for keys, onlines in shadows.others:
                lerp_(keys, onlines, weight)
            shadows.update_(groups, weight)
            shadows.stamp(pairs) if compiling else shadows._stamp(pairs)
        else:
            for keys, onlines in pairs.groups:
                lerp_(keys, onlines, weight)
        if self.buffers_mode == "own":
            return
        bufs = self._pairs("buffer")
        for keys, onlines in bufs.other_groups:
            torch._foreach_copy_(keys, onlines)
        for keys, onlines in bufs.float_groups:
            if self.buffers_mode == "ema":
                lerp_(keys, onlines, weight)
            else:
                torch._foreach_copy_(keys, onlines)

    def _pairs(self, kind: str) -> TensorPairs:
        """The (cached) pairing of ``kind`` tensors, validated against both models."""
        params = kind == "parameter"
        cached = self._param_pairs if params else self._buffer_pairs
        try:
            pairs = current_pairs(kind, cached, self.online, unwrap_model(self.key_encoder))
        except ValueError:
            refuse_fsdp1(self.online)  # wrapped in FSDP1 after construction: say so
            refuse_fsdp1(self.key_encoder)
            raise
        # FSDP1 wrapped after construction: checked eagerly (torch 2.5's and 2.6's Dynamo
        # cannot trace the check; a pairing failure still names FSDP1, above)
        if pairs is not cached and not torch.compiler.is_compiling():
            refuse_fsdp1(self.online)
        if params:
            self._param_pairs = pairs
        else:
            self._buffer_pairs = pairs
        return pairs

    def extra_repr(self) -> str:
        dtype = "" if self.ema_dtype is None else f", ema_dtype={self.ema_dtype}"
        return f"momentum={self.momentum}, buffers={self.buffers_mode!r}{dtype}"


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
