"""Split BatchNorm: Shuffle-BN's batch statistics on a single device.

Shuffle-BN (MoCo v1) keeps BatchNorm from leaking which key matches which query:
each GPU normalises its own sub-batch, and the key encoder sees its samples in a
shuffled assignment to GPUs. On one device, [`SplitBatchNorm`][] normalises
``num_splits`` sub-batches separately, as that many GPUs would, and
[`batch_shuffle`][momentum_contrast.distributed.batch_shuffle] shuffles which
samples share a sub-batch; together they are Shuffle-BN for single-GPU training.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from momentum_contrast._checks import check_positive_int

__all__ = ["SplitBatchNorm", "convert_split_batchnorm"]


class SplitBatchNorm(_BatchNorm):
    """BatchNorm over ``num_splits`` equal, contiguous sub-batches, separately.

    In training, rows ``[s * N/S, (s+1) * N/S)`` are normalised with their own
    statistics, and the running statistics move by the average of the
    sub-batches' updates (what ``num_splits`` ordinary BatchNorms on
    ``num_splits`` devices would hold on average). In eval mode it is ordinary
    BatchNorm. Parameters, buffers and ``state_dict`` keys are those of
    ``nn.BatchNorm2d``, so checkpoints move freely between the two.

    Args:
        num_features: channels ``C`` of the ``(N, C, *)`` input.
        num_splits: number of sub-batches ``S``; ``N`` must be divisible by it.
        eps: added to the variance, as ``nn.BatchNorm2d``.
        momentum: running-statistics momentum, as ``nn.BatchNorm2d``.
        affine: learnable scale and shift, as ``nn.BatchNorm2d``.
        track_running_stats: keep running statistics, as ``nn.BatchNorm2d``.
        device: where the parameters and buffers are created.
        dtype: their floating-point type.

    Examples:
        >>> import torch
        >>> from momentum_contrast.norm import SplitBatchNorm
        >>> bn = SplitBatchNorm(16, num_splits=4)
        >>> y = bn(torch.randn(32, 16, 8, 8))  # four sub-batches of 8
        >>> y[:8].mean().abs() < 1e-5
        tensor(True)
    """

    def __init__(
        self,
        num_features: int,
        num_splits: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype
        )
        self.num_splits = check_positive_int("num_splits", num_splits)

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"input must be (N, C, *), got shape {tuple(input.shape)}")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Normalise ``(N, C, *)``; in training, each of the ``num_splits`` sub-batches alone."""
        self._check_input_dim(input)
        if not self.training or self.num_splits == 1:
            return super().forward(input)
        s, n = self.num_splits, input.shape[0]
        if n % s:
            raise ValueError(
                f"input batch size must be divisible by num_splits={s}, got {n} rows (leave out "
                "a smaller last batch: DataLoader(..., drop_last=True))"
            )
        if n // s * math.prod(input.shape[2:]) == 1:  # torch's error would not name num_splits
            raise ValueError(
                f"input: each of the num_splits={s} sub-batches must hold more than one value "
                f"per channel to normalise in training, got {n // s} row(s) of shape "
                f"{tuple(input.shape[1:])}: use fewer splits or larger batches"
            )
        factor = 0.0 if self.momentum is None else self.momentum
        means: list[torch.Tensor | None] = [None] * s
        variances: list[torch.Tensor | None] = [None] * s
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative average, as nn.BatchNorm
                factor = 1.0 / float(self.num_batches_tracked)
            assert self.running_mean is not None and self.running_var is not None
            means = [self.running_mean.clone() for _ in range(s)]  # each split moves its own
            variances = [self.running_var.clone() for _ in range(s)]
        # the sub-batches are views in the input's memory format (channels_last stays so)
        sub_batches = zip(input.chunk(s), means, variances, strict=True)  # (N/S, C, *) each
        y = torch.cat(
            [
                F.batch_norm(x, mean, var, self.weight, self.bias, True, factor, self.eps)
                for x, mean, var in sub_batches
            ]
        )
        if self.running_mean is not None and self.running_var is not None and means[0] is not None:
            self.running_mean.copy_(torch.stack(means).mean(dim=0))  # type: ignore[arg-type]
            self.running_var.copy_(torch.stack(variances).mean(dim=0))  # type: ignore[arg-type]
        return y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_splits={self.num_splits}"  # type: ignore[no-untyped-call]


def convert_split_batchnorm(model: nn.Module, num_splits: int) -> nn.Module:
    """Turn every ``BatchNorm1d/2d/3d`` in ``model`` (``model`` itself too) into a
    [`SplitBatchNorm`][], in place.

    The modules stay the same objects with the same parameters and buffers, so
    ``state_dict()``, ``requires_grad`` flags, device, dtype and the train/eval mode
    are unchanged, an optimizer built before stays valid, and a BatchNorm shared by two
    parents stays shared. A ``SplitBatchNorm`` already there takes the new
    ``num_splits``. Any other BatchNorm (``SyncBatchNorm``, a lazy one, a subclass with
    behaviour of its own: timm's ``BatchNormAct2d``, one sharded by ``fully_shard`` or
    parametrized) raises ``TypeError`` naming it: converting it would drop that behaviour,
    and leaving it would silently keep the batch statistics unsplit. Returns ``model``.

    A converted module is no longer an ``nn.BatchNorm2d`` (``SplitBatchNorm`` is a
    ``torch.nn.modules.batchnorm._BatchNorm``, as every torch BatchNorm is): code that finds
    BatchNorms by ``isinstance(m, nn.BatchNorm2d)`` (timm's ``freeze_batch_norm_2d``, a
    no-weight-decay parameter group) misses them; run it before, or test for ``_BatchNorm``.
    Convert before building the ``MomentumEncoder``, whose copy keeps what it copied (a
    later conversion of the online model's BatchNorms alone makes its updates warn; a
    later change of a ``SplitBatchNorm``'s count alone is not seen).

    Args:
        model: any module.
        num_splits: sub-batches per forward (e.g. 8 to emulate 8 GPUs).

    Examples:
        >>> import torchvision
        >>> from momentum_contrast.norm import SplitBatchNorm, convert_split_batchnorm
        >>> net = convert_split_batchnorm(torchvision.models.resnet18(), num_splits=8)
        >>> isinstance(net.bn1, SplitBatchNorm)
        True
    """
    splits = check_positive_int("num_splits", num_splits)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    plain = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    if others := [
        f"{name or 'model'} ({type(m).__name__})"
        for name, m in model.named_modules()
        if isinstance(m, _BatchNorm) and type(m) not in (*plain, SplitBatchNorm)
    ]:  # its own forward (an activation, a sharding, a parametrization) would be lost
        raise TypeError(
            "convert_split_batchnorm converts BatchNorm1d/2d/3d themselves, not other "
            f"BatchNorms or subclasses with their own behaviour: {others}"
        )
    for module in model.modules():
        if type(module) in plain:  # the same module, parameters and buffers
            module.__class__ = SplitBatchNorm
        if isinstance(module, SplitBatchNorm):  # a second call sets the new count
            module.num_splits = splits
    return model
