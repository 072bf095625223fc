"""The momentum (key) encoder: an exponential moving average of the online model."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from typing import Any, Literal, get_args

import torch
from torch import nn
from torch.utils._pytree import tree_map_only

from momentum_contrast._casts import keeping_dtype
from momentum_contrast._checks import check_choice, check_positive, check_real, check_unit_interval
from momentum_contrast._dtensor import fsdp2_modules, refuse_fsdp1
from momentum_contrast._ema import check_momentum, lerp_
from momentum_contrast._pairing import Pairs, current, ema_dtype_problem, pair_by_name
from momentum_contrast._walk import walk

__all__ = ["BufferMode", "MomentumEncoder", "cosine_momentum", "unwrap_model"]

BufferMode = Literal["own", "copy", "ema"]
"""What [`MomentumEncoder`][] does with the online model's buffers (``buffers=``).

``"own"``: the key encoder keeps and updates its own buffers in its forward (the
papers' reference: BatchNorm statistics of the key encoder are its own); ``"copy"``:
buffers are copied from the online model at every update; ``"ema"``: floating-point
(and complex) buffers are averaged like parameters (integer buffers, such as BatchNorm's
``num_batches_tracked``, are always copied, never averaged), as ``key + (1 - m) *
(online - key)``: a buffer holding ``inf`` (an additive attention mask) becomes NaN.

Examples:
    >>> from typing import get_args
    >>> from momentum_contrast.encoder import BufferMode
    >>> get_args(BufferMode)
    ('own', 'copy', 'ema')
"""


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
    """Key encoder of MoCo: a frozen copy of ``online``, updated as its moving average.

    Call [`update`][] once after every optimizer step: ``key = m * key + (1 - m) * online``
    on every parameter, in place, in fused multi-tensor ops (one per device and dtype
    group), the parameters paired by name. A second update with no optimizer step since the
    previous one warns, once two updates have each found a step since the update before
    them (with an update after every step, from the third step on; with one per
    micro-batch, in the third accumulation window; not after the steps of a fused optimizer,
    which leave no trace): the momentum would compound to ``m**2``.

    Nothing can leave the key encoder silently stale. Every update walks both models and
    compares, on the host (no tensor value is read, so it is safe in a CUDA graph), the
    names, tensor objects and data addresses with the previous update's. A replaced,
    reloaded or moved tensor on either side (``load_state_dict(assign=True)``, a swapped
    submodule, a new ``.key_encoder`` or ``.online``) is paired again by name; a real
    mismatch (a parameter added, renamed or reshaped, one side moved alone) raises a
    ``ValueError`` naming it; a BatchNorm converted on one side after the copy was taken
    (``convert_split_batchnorm``, ``convert_sync_batchnorm``) warns. Under
    ``torch.compile(encoder.update)`` Dynamo's guards stand for the walk; what only an
    eager update sees is listed in the concepts guide
    ([What an update checks][what-an-update-checks]).

    The key encoder's modules start in the modes of the online model's (a BatchNorm or a
    dropout you put in eval mode stays so); ``encoder.train()`` and ``encoder.eval()`` set
    them. The first update warns where a module trains online but not in the key encoder:
    a model loaded in eval mode (as ``transformers``' ``from_pretrained`` returns it) and
    put in training mode after the copy, whose keys would come from frozen BatchNorm
    statistics; call ``encoder.train()``.

    The copy is taken when it is built, with ``copy.deepcopy``, which copies the hooks
    registered on the online model too (a hook function that stores activations in a dict
    of yours is then also called by the key encoder's forward; a hook object is copied with
    its state): build it once the online weights are initialised or loaded (lazy modules
    included). Values written in place afterwards (an init run on the online model after
    construction; a meta-device model's ``to_empty`` and init, which leave the copy
    uninitialised memory) are no change of tensors: copy them again with
    ``encoder.key_encoder.load_state_dict(encoder.online.state_dict())``.

    ``online`` is kept as a plain reference (``.online``), not a submodule, so
    ``state_dict()``, ``parameters()`` and ``.to()`` concern the key encoder only.
    ``copy.deepcopy`` and pickling copy the online model with it, and the copy follows that
    copy: to make it follow the model you train, assign ``copy.online = model``.

    FSDP2 (``fully_shard`` of the online model and of ``.key_encoder``, any settings): an
    update reshards the modules left unsharded (a root after a no-grad forward), so the
    next forward gathers the updated shards, and averages the local shards of the
    ``DTensor`` parameters; one side sharded and the other not, or another mesh or
    placements, raises a ``ValueError``.

    Args:
        online: the query encoder being trained (any ``nn.Module``). ``DataParallel``,
            ``DistributedDataParallel`` and ``torch.compile`` wrappers are unwrapped.
        momentum: default ``m`` in ``[0, 1]``; 0.999 as MoCo v1/v2 (v3 uses 0.99
            with [`cosine_momentum`][]).
        buffers: what happens to buffers (BatchNorm running statistics) on update.
            ``"own"`` (default, as the papers): the key encoder keeps its own,
            updated by its own forward passes. ``"copy"``: copied from the online
            model. ``"ema"``: floating-point (and complex) buffers averaged like parameters.
            Integer buffers (``num_batches_tracked``) are copied, never averaged.
        ema_dtype: ``None`` (default): the key encoder has the online model's dtypes and is
            averaged in them; a bfloat16 or float16 key encoder stalls (most steps
            ``(1 - m) * (online - key)`` round away), so its first update warns.
            ``torch.float32``, for bfloat16 or float16 online weights: the key encoder's
            floating parameters and buffers are float32 from construction on, and stay
            float32 through any cast of a parent module (``.to(torch.bfloat16)``,
            Lightning's ``bf16-true``), which still moves them between devices. They are
            the only state: the average runs on them, ``state_dict()`` saves them, and any
            write to them is simply the new state (``load_state_dict`` without
            ``assign=True``, which would put the file's dtype in their place). The forward
            runs under ``torch.autocast`` to the online model's dtype (that of its first
            floating parameter not in ``ema_dtype``: weights kept in float32, such as norms,
            are passed over), and floating outputs come out in that dtype. A key encoder in
            ``ema_dtype`` follows bfloat16/float16 weights in float32, or weights of its own
            dtype; any other pair raises ``ValueError`` (at construction, and at the next
            ``forward`` or ``update`` after a cast of the online model). Complex weights,
            which outputs are cast, autocast's limits and the update's float32 scratch are
            in the concepts guide: [Low precision][low-precision-the-key-encoder-is-the-only-state].

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
        >>> bf16.key_encoder.weight.dtype, bf16(torch.randn(2, 8).bfloat16()).dtype
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
        if ema_dtype is not None and (
            not isinstance(ema_dtype, torch.dtype) or not ema_dtype.is_floating_point
        ):
            raise TypeError(f"ema_dtype must be None or a floating torch.dtype, got {ema_dtype!r}")
        refuse_fsdp1(online)
        self.momentum = check_unit_interval("momentum", momentum)
        self.buffers_mode: BufferMode = check_choice("buffers", buffers, get_args(BufferMode))  # type: ignore[assignment]
        self.ema_dtype = ema_dtype
        base = unwrap_model(online)
        self.__dict__["_online"] = base  # a reference, not a submodule
        if fsdp2_modules(base):  # a sharded model cannot be copied
            raise TypeError(
                "MomentumEncoder: cannot copy a model already sharded by fully_shard; build "
                "the MomentumEncoder first, then fully_shard the online model and .key_encoder"
            )
        try:  # without autograd: a TorchScript module's copies would be non-leaf tensors
            with torch.no_grad():
                key_encoder = copy.deepcopy(base)
        except RuntimeError as e:  # torch's copy refuses a tensor with a history (not OOM)
            if "deepcopy protocol" not in str(e):
                raise
            raise TypeError(
                "MomentumEncoder: online cannot be copied: it holds a tensor with an autograd "
                "history, which copy.deepcopy refuses: a weight of torch.nn.utils.prune, of "
                "the older torch.nn.utils.weight_norm (or spectral_norm after a forward), "
                "or an output kept as an attribute; use "
                "torch.nn.utils.parametrizations.weight_norm/spectral_norm, prune.remove, or "
                f"build it before such a forward ({e})"
            ) from e
        if ema_dtype is not None:
            for name, t in [*base.named_parameters(), *base.named_buffers()]:
                if t.is_floating_point() and (
                    problem := ema_dtype_problem(repr(name), t.dtype, ema_dtype)
                ):
                    raise ValueError(f"MomentumEncoder: {problem}")
            # id -> cast, the originals not held (a buffer is freed once replaced): one _apply
            # visits every module once, so an id looked up is that of a tensor a module
            # still holds, never a reused one
            cast: dict[int, torch.Tensor] = {}

            def to_ema_dtype(t: torch.Tensor) -> torch.Tensor:
                if not t.is_floating_point():  # integer and complex tensors keep their dtype
                    return t
                if id(t) not in cast:  # a tensor two modules share gets one cast, still shared
                    cast[id(t)] = t.to(ema_dtype)
                return cast[id(t)]

            key_encoder._apply(to_ema_dtype)  # type: ignore[no-untyped-call]
        _tie_as_online(base, key_encoder)
        self.key_encoder = key_encoder
        for p in self.key_encoder.parameters():  # a tensor subclass's deepcopy keeps .grad
            p.requires_grad_(False)
            p.grad = None
        self._pairs: dict[str, Pairs] = {}
        # the online weights' version counters at the last update, how many times an
        # update found them moved since the one before, and which warnings were given
        self._last_versions: tuple[int, ...] | None = None
        self._version_moves = 0
        self._warned_misplaced = self._warned_low = False

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
        previous, self.__dict__["_online"] = self.online, unwrap_model(model)
        try:
            self._pairs = {}
            for kind in ("parameter",) if self.buffers_mode == "own" else ("parameter", "buffer"):
                self._paired(kind)
        except Exception:  # a mismatch, or a warning that the filters made an error
            self.__dict__["_online"], self._pairs = previous, {}
            raise
        self._last_versions, self._version_moves = None, 0  # another model's counters

    def __getstate__(self) -> dict[str, Any]:
        """Pickling and ``copy.deepcopy`` leave the pairing (and its scratch) behind: the copy
        pairs its own tensors at its first update."""
        return {**super().__getstate__(), "_pairs": {}}  # type: ignore[no-untyped-call]

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "online":  # nn.Module.__setattr__ would register it as a submodule
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:
        if self.ema_dtype is None:
            return super()._apply(fn, recurse)  # type: ignore[no-any-return,no-untyped-call]
        self.key_encoder._apply(keeping_dtype(fn))  # type: ignore[no-untyped-call]  # a cast moves it
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the key encoder under ``torch.no_grad()`` (same signature as ``online``)."""
        ema_dtype = self.ema_dtype
        weights = () if ema_dtype is None else self.online.parameters()
        # the dtype to autocast to: the first floating weight's not in ema_dtype (weights the
        # model keeps in ema_dtype, such as float32 norms, are passed over)
        first = next((p for p in weights if p.is_floating_point() and p.dtype != ema_dtype), None)
        if first is None or ema_dtype is None:
            with torch.no_grad():
                return self.key_encoder(*args, **kwargs)
        dtype = first.dtype
        if ema_dtype_problem("", dtype, ema_dtype):  # cast wider since the copy was taken
            name = next(repr(n) for n, p in self.online.named_parameters() if p is first)
            raise ValueError(f"MomentumEncoder: {ema_dtype_problem(name, dtype, ema_dtype)}")
        with torch.no_grad(), torch.autocast(first.device.type, dtype=dtype):
            out = self.key_encoder(*args, **kwargs)
        return tree_map_only(
            torch.Tensor, lambda t: t.to(dtype) if t.is_floating_point() else t, out
        )

    @torch.no_grad()
    def update(self, momentum: float | torch.Tensor | None = None) -> None:
        """One in-place step ``key = m * key + (1 - m) * online`` on every parameter.

        Both models are checked first (see the class).

        Args:
            momentum: ``m`` for this step (``None``: ``self.momentum``), a float in
                ``[0, 1]`` or a 0-d floating tensor on the parameters' device, never
                read on the host (the caller keeps it in ``[0, 1]``): fill it before
                each replay of a CUDA graph holding the update; under ``torch.compile``
                a new value does not recompile. ``1`` keeps the key, ``0`` copies (a
                0-d tensor ``0``, or any ``0`` under ``torch.compile``, up to the rounding
                of ``key + (online - key)``).

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
        pairs = self._paired("parameter")
        # (average?, group): buffers are paired before anything is written
        work = [(True, group) for group in pairs.groups]
        if self.buffers_mode != "own":
            average = self.buffers_mode == "ema"
            work += [(average, group) for group in self._paired("buffer").groups]
        # the default too (an attribute anyone may set), against every group written
        devices = {keys[0].device for _, (keys, *_) in work}
        m = check_momentum(self.momentum if momentum is None else momentum, devices)
        if not torch.compiler.is_compiling():
            self._warn_if_misused(pairs)
        weight = 1.0 - m  # key += (1 - m) * (online - key); a 0-d tensor stays on the device
        for average, (keys, onlines, scratch) in work:
            if average and keys[0].is_floating_point():  # complex: as (real, imaginary)
                lerp_(keys, onlines, weight, scratch)
            else:  # integer tensors, and buffers="copy"
                torch._foreach_copy_(keys, onlines)

    def _paired(self, kind: str) -> Pairs:
        """The pairing of ``kind`` tensors, checked against both models. Compiled, it is
        traced and Dynamo's guards stand for the cache, neither read nor kept (a pairing kept
        would fail the guard that the first compiled call set on it, and recompile)."""
        key_encoder = unwrap_model(self.key_encoder)
        if torch.compiler.is_compiling():
            online, key = walk(self.online, kind), walk(key_encoder, kind)
            return pair_by_name(kind, online, key, self.ema_dtype, True)
        pairs = current(kind, self._pairs.get(kind), self.online, key_encoder, self.ema_dtype)
        self._pairs[kind] = pairs
        return pairs

    def _warn_if_misused(self, pairs: Pairs) -> None:
        """Warn once each: key-encoder modules in eval mode that train online (at the first
        update of an online model), an update with no optimizer step since the previous one,
        and a low-precision key encoder without ``ema_dtype``. A step moves the online weights'
        version counters; once steps were seen to move them (twice: a reload of the online
        weights moves them once), an update that finds them where the previous one left them
        had no step before it. (A fused optimizer moves no counter: with one, nothing is
        learned and nothing is said.)"""
        versions, last = tuple([t._version for t in pairs.onlines]), self._last_versions
        if last is None:  # the first update of this online model
            self._warn_if_idle()
        self._version_moves += last is not None and versions != last
        self._last_versions = versions
        if versions == last and self._version_moves >= 2 and not self._warned_misplaced:
            self._warned_misplaced = True
            warnings.warn(
                "MomentumEncoder.update() ran again with the online model unchanged since the "
                "previous update (no optimizer step in between): the momentum compounds to "
                "m**2. Call it once per optimizer step: after optimizer.step(); in Lightning, "
                "in an optimizer_step override, not on_train_batch_end; in Accelerate, under "
                "`if accelerator.sync_gradients:`. (A step that a GradScaler skipped after an "
                "fp16 overflow looks the same: then ignore this.)",
                RuntimeWarning,
                stacklevel=4,  # the caller of update()
            )
        low = [
            k[0].dtype for k, *_ in pairs.groups if k[0].dtype in (torch.bfloat16, torch.float16)
        ]
        if low and not self._warned_low:
            self._warned_low = True
            warnings.warn(
                f"MomentumEncoder: the key encoder is {low[0]}, too coarse for a moving average "
                "(most steps (1 - m) * (online - key) round away and the key encoder stalls); "
                "build it with ema_dtype=torch.float32",
                RuntimeWarning,
                stacklevel=4,
            )

    def _warn_if_idle(self) -> None:
        """Warn where a module trains online but not in the key encoder."""
        keys = dict(unwrap_model(self.key_encoder).named_modules())
        if idle := [
            repr(name or "the model")
            for name, module in self.online.named_modules()
            if module.training and name in keys and not keys[name].training
        ]:
            warnings.warn(
                f"MomentumEncoder: modules train online but not in the key encoder: "
                f"{', '.join(idle[:3])}{' ...' * (len(idle) > 3)} (a model loaded in eval "
                "mode, then put in training mode after the copy); call encoder.train()",
                RuntimeWarning,
                stacklevel=5,  # the caller of update()
            )

    def extra_repr(self) -> str:
        dtype = "" if self.ema_dtype is None else f", ema_dtype={self.ema_dtype}"
        return f"momentum={self.momentum}, buffers={self.buffers_mode!r}{dtype}"


def _tie_as_online(online: nn.Module, key_encoder: nn.Module) -> None:
    """Give the copy's parameters that are one memory in ``online`` but other objects (a
    ``load_state_dict(assign=True)`` of tied weights) one memory too, as other objects:
    ``copy.deepcopy`` gives each its own memory, and the key encoder would no longer match
    the online model's ties (told by memory eagerly, by object under ``torch.compile``)."""
    first: dict[tuple[object, ...], str] = {}  # (address, dtype, shape, stride) -> a name
    for name, p in online.named_parameters(remove_duplicate=False):
        try:
            address = p.data_ptr()
        except (RuntimeError, NotImplementedError):  # a subclass without storage
            continue
        if not address:  # no memory (meta, empty): nothing shared to keep
            continue
        tied_to = first.setdefault((address, p.dtype, p.shape, p.stride()), name)
        if tied_to != name and online.get_parameter(tied_to) is not p:  # tied by memory only
            module, _, attr = name.rpartition(".")
            shared = nn.Parameter(key_encoder.get_parameter(tied_to).detach(), requires_grad=False)
            setattr(key_encoder.get_submodule(module), attr, shared)


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
    total = check_positive("total_steps", total_steps)
    s = check_real("step", step)
    if not 0 <= s <= total:
        raise ValueError(f"step must be in [0, total_steps={total_steps}], got {step}")
    b = check_unit_interval("base", base)
    f = check_unit_interval("final", final)
    return (
        f - (f - b) * (math.cos(math.pi * (s / total)) + 1.0) / 2.0
    )  # s / total first: no overflow
