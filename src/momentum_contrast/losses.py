"""Contrastive losses: InfoNCE (MoCo v1/v2) and the symmetric loss of MoCo v3."""

from __future__ import annotations

import contextlib
import functools
import numbers
from typing import Literal

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

from momentum_contrast._checks import (
    check_bool,
    check_choice,
    check_float_matrix,
    check_positive,
    check_same_device,
    check_same_shape,
)
from momentum_contrast._collectives import Group, gather_with_sizes, rank, world_size
from momentum_contrast._queue_cross_entropy import QueueCrossEntropy

__all__ = [
    "InfoNCE",
    "Reduction",
    "SymmetricContrastiveLoss",
    "info_nce",
    "symmetric_contrastive_loss",
]

Reduction = Literal["mean", "sum", "none"]
"""How the per-query losses are combined (``reduction=``): their mean, their sum, or none
(a ``(N,)`` tensor).

Examples:
    >>> from typing import get_args
    >>> from momentum_contrast.losses import Reduction
    >>> get_args(Reduction)
    ('mean', 'sum', 'none')
"""


def _float32_context(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """Disable autocast so logits and loss are computed in (at least) float32."""
    # CPU and CUDA always have autocast: asked only for the other devices, as the Dynamo of
    # torch 2.5 and 2.6 cannot trace the question
    if device.type in ("cpu", "cuda") or torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def info_nce(
    query: torch.Tensor,
    positive_key: torch.Tensor,
    negative_keys: torch.Tensor | None = None,
    *,
    temperature: float = 0.07,
    reduction: Reduction = "mean",
    normalize: bool = True,
) -> torch.Tensor:
    """InfoNCE loss of MoCo v1/v2: each query against its key and the negatives.

    With ``negative_keys`` the logits of query ``i`` are ``[q_i·k_i, q_i·n_1, …,
    q_i·n_M] / T`` and the target is index 0: the reference's ``cat`` + cross-entropy,
    computed without the ``(N, 1 + M)`` concatenation (eagerly; under ``torch.compile``
    as the reference), so equal to it up to float rounding. Without them, the other rows
    of ``positive_key`` are the negatives: logits ``q @ k.T / T``, targets ``arange(N)``,
    this process's rows only (for negatives from every rank, gather the keys with
    [`concat_all_gather`][momentum_contrast.distributed.concat_all_gather], or use
    [`symmetric_contrastive_loss`][], which does).

    Logits and loss are computed in float32 (float64 if any input is float64), also
    under ``torch.autocast``. Keys and negatives are detached: no gradient
    flows into them.

    Args:
        query: ``(N, D)`` float tensor from the query encoder.
        positive_key: ``(N, D)`` float tensor, the key of each query.
        negative_keys: ``(M, D)`` float tensor, e.g. ``KeyQueue.negatives()``,
            used as given: they must already be unit-norm (a ``KeyQueue`` with
            ``normalize=True`` guarantees it). Any float dtype (bf16 queues included).
        temperature: ``T > 0``; 0.07 as MoCo v1 (v2 uses 0.2).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (a ``(N,)`` tensor).
        normalize: L2-normalise ``query`` and ``positive_key`` first.

    Returns:
        The loss: a scalar, or ``(N,)`` with ``reduction="none"``.

    Examples:
        >>> import torch
        >>> from momentum_contrast import info_nce
        >>> q, k = torch.randn(8, 128, requires_grad=True), torch.randn(8, 128)
        >>> queue = torch.nn.functional.normalize(torch.randn(4096, 128), dim=1)
        >>> loss = info_nce(q, k, queue, temperature=0.2)
        >>> loss.backward()
        >>> loss.shape, q.grad.shape
        (torch.Size([]), torch.Size([8, 128]))
        >>> info_nce(q, k, reduction="none").shape  # in-batch negatives
        torch.Size([8])
    """
    check_float_matrix("query", query)
    check_float_matrix("positive_key", positive_key)
    check_same_shape("positive_key", positive_key, "query", query)
    check_same_device("positive_key", positive_key, "query", query)
    if negative_keys is not None:
        check_float_matrix(
            "negative_keys",
            negative_keys,
            query.shape[1],
            "the query's width; a KeyQueue's dim must equal the head's output width",
        )
        check_same_device("negative_keys", negative_keys, "query", query)
    t = check_positive("temperature", temperature)
    check_choice("reduction", reduction, ("mean", "sum", "none"))
    check_bool("normalize", normalize)
    given = [t.dtype for t in (query, positive_key, negative_keys) if t is not None]
    dtype = functools.reduce(torch.promote_types, given, torch.float32)  # float64 if any is
    n = query.shape[0]
    with _float32_context(query.device):
        q = query.to(dtype)  # (N, D)
        k = positive_key.detach().to(dtype)  # (N, D)
        if normalize:
            q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
        if negative_keys is None:
            logits = q @ k.T / t  # (N, N)
            targets = torch.arange(n, device=q.device)
            return F.cross_entropy(logits, targets, reduction=reduction)
        negatives = negative_keys.detach().to(dtype)  # (M, D)
        # the compiler fuses the plain form itself; torch.func's transforms and forward-mode AD
        # (a tangent on the query: the keys are detached) cannot run QueueCrossEntropy
        if (
            torch.compiler.is_compiling()
            or torch._C._are_functorch_transforms_active()
            or fwAD.unpack_dual(query).tangent is not None  # type: ignore[no-untyped-call]
        ):
            l_pos = (q * k).sum(dim=1, keepdim=True)  # (N, 1)
            logits = torch.cat([l_pos, q @ negatives.T], dim=1) / t  # (N, 1 + M)
            targets = torch.zeros(n, dtype=torch.long, device=q.device)
            return F.cross_entropy(logits, targets, reduction=reduction)
        losses: torch.Tensor = QueueCrossEntropy.apply(q / t, k, negatives)  # (N,)
        if reduction == "none":
            return losses
        return losses.mean() if reduction == "mean" else losses.sum()


def _ctr(q: torch.Tensor, k: torch.Tensor, t: float, first: int) -> torch.Tensor:
    """MoCo v3's ``ctr``: cross-entropy of ``q`` against the unit keys ``k`` (all ranks'),
    query ``i``'s positive in column ``first + i``, times 2T."""
    logits = F.normalize(q, dim=1) @ k.T / t  # (N, M)
    labels = torch.arange(q.shape[0], device=q.device) + first  # own key's column
    return F.cross_entropy(logits, labels) * (2 * t)


def symmetric_contrastive_loss(
    q1: torch.Tensor,
    q2: torch.Tensor,
    k1: torch.Tensor,
    k2: torch.Tensor,
    *,
    temperature: float = 1.0,
    gather: bool = True,
    positive_offset: int | None = None,
    group: Group = None,
) -> torch.Tensor:
    """MoCo v3 loss ``ctr(q1, k2) + ctr(q2, k1)`` with in-batch negatives.

    ``ctr(q, k)`` is the cross-entropy of ``normalize(q) @ normalize(all_gather(k)).T / T``
    against ``arange(N) + N * rank`` (the rows of earlier ranks, when batch sizes
    differ), multiplied by ``2 * T`` as the reference
    (which keeps the gradient scale independent of ``T``). Keys are detached and
    gathered from every rank when ``gather`` and ``torch.distributed`` is
    initialised (both views in one gather); without a process group it is the
    single-process loss. Computed in float32 (float64 for float64 inputs), also under
    autocast.

    Gradient accumulation: compute the keys of the whole local batch first (``M``
    rows), then pass each micro-batch's ``N`` queries with all ``M`` keys and
    ``positive_offset``, the row of the local keys holding the first query's positive
    (the micro-batch's start). Every micro-batch then scores against the keys of the
    whole batch of every rank, and the sum of the micro-batch losses divided by their
    number is the full batch's loss (equal micro-batches), gradients included.

    Args:
        q1: ``(N, D)`` predictor output for view one.
        q2: ``(N, D)`` predictor output for view two.
        k1: ``(M, D)`` momentum-encoder output for view one; ``M = N`` unless
            ``positive_offset`` is given.
        k2: ``(M, D)`` momentum-encoder output for view two.
        temperature: ``T > 0``; 1.0 as the MoCo v3 ResNet recipe (0.2 for ViT).
        gather: use the keys of all ranks as negatives (the reference does).
        group: the process group whose ranks' keys are gathered (a data-parallel group);
            the whole world by default. ``rank`` above is the rank in it.
        positive_offset: ``None`` (keys and queries are the same rows), or a host
            int ``s`` with ``0 <= s`` and ``s + N <= M``: query ``i``'s positive is
            local key row ``s + i``.

    Returns:
        Scalar loss.

    Examples:
        >>> import torch
        >>> from momentum_contrast import symmetric_contrastive_loss
        >>> q1, q2 = torch.randn(16, 256, requires_grad=True), torch.randn(16, 256)
        >>> k1, k2 = torch.randn(16, 256), torch.randn(16, 256)
        >>> loss = symmetric_contrastive_loss(q1, q2, k1, k2, temperature=0.2)
        >>> loss.backward()
        >>> loss.shape
        torch.Size([])
        >>> micro = symmetric_contrastive_loss(  # queries 4..7 against all 16 keys
        ...     q1[4:8], q2[4:8], k1, k2, temperature=0.2, positive_offset=4
        ... )
    """
    check_float_matrix("q1", q1)
    for name, x in (("q2", q2), ("k1", k1), ("k2", k2)):
        check_float_matrix(name, x, q1.shape[1], "q1's width")
        check_same_device(name, x, "q1", q1)
    check_same_shape("q2", q2, "q1", q1)
    check_same_shape("k2", k2, "k1", k1)
    n, m = q1.shape[0], k1.shape[0]
    if positive_offset is None:
        check_same_shape("k1", k1, "q1", q1)
        first = 0
    else:
        if isinstance(positive_offset, bool) or not isinstance(positive_offset, numbers.Integral):
            raise TypeError(
                f"positive_offset must be an int or None, got {type(positive_offset).__name__}"
            )
        if m < n:
            raise ValueError(
                f"with positive_offset, k1 and k2 must have at least as many rows as q1 "
                f"(M = {m} keys, N = {n} queries)"
            )
        if not 0 <= positive_offset <= m - n:
            raise ValueError(
                f"positive_offset must be in [0, M - N] = [0, {m - n}] (M = {m} keys, "
                f"N = {n} queries), got {positive_offset}"
            )
        first = int(positive_offset)
    t = check_positive("temperature", temperature)
    check_bool("gather", gather)
    dtype = functools.reduce(torch.promote_types, (q1.dtype, q2.dtype, k1.dtype, k2.dtype))
    dtype = torch.promote_types(dtype, torch.float32)  # float64 if any input is
    with _float32_context(q1.device):
        a, b = q1.to(dtype), q2.to(dtype)
        keys = torch.cat([F.normalize(k.detach().to(dtype), dim=1) for k in (k1, k2)], dim=1)
        if gather and world_size(group) != 1:  # -1: not in the group, refused there
            keys, sizes = gather_with_sizes(keys, group)  # (sum of M over ranks, 2D): one gather
            first += sum(sizes[: rank(group)])  # M * rank when every rank has M rows
        c, d = keys[:, : q1.shape[1]], keys[:, q1.shape[1] :]
        return _ctr(a, d, t, first) + _ctr(b, c, t, first)


class InfoNCE(nn.Module):
    """Module form of [`info_nce`][], holding ``temperature`` and ``reduction``.

    Every argument is keyword-only, as in the function.

    Args:
        temperature: ``T > 0``; 0.07 as MoCo v1 (v2 uses 0.2).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        normalize: L2-normalise query and positive key first.

    Examples:
        >>> import torch
        >>> from momentum_contrast import InfoNCE, KeyQueue
        >>> criterion, queue = InfoNCE(temperature=0.2), KeyQueue(4096, 128)
        >>> q, k = torch.randn(8, 128), torch.randn(8, 128)
        >>> criterion(q, k, queue.negatives()).shape
        torch.Size([])
    """

    def __init__(
        self, *, temperature: float = 0.07, reduction: Reduction = "mean", normalize: bool = True
    ) -> None:
        super().__init__()
        self.temperature = check_positive("temperature", temperature)
        self.reduction: Reduction = check_choice(  # type: ignore[assignment]
            "reduction", reduction, ("mean", "sum", "none")
        )
        self.normalize = check_bool("normalize", normalize)

    def forward(
        self,
        query: torch.Tensor,
        positive_key: torch.Tensor,
        negative_keys: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Args as [`info_nce`][]: query and positive key ``(N, D)``, negatives ``(M, D)``."""
        return info_nce(
            query,
            positive_key,
            negative_keys,
            temperature=self.temperature,
            reduction=self.reduction,
            normalize=self.normalize,
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, reduction={self.reduction!r}"


class SymmetricContrastiveLoss(nn.Module):
    """Module form of [`symmetric_contrastive_loss`][] (MoCo v3).

    Every argument is keyword-only, as in the function.

    Args:
        temperature: ``T > 0``; 1.0 as the MoCo v3 ResNet recipe (0.2 for ViT).
        gather: use the keys of all ranks as negatives.

    Examples:
        >>> import torch
        >>> from momentum_contrast import SymmetricContrastiveLoss
        >>> criterion = SymmetricContrastiveLoss(temperature=1.0)
        >>> q1, q2, k1, k2 = torch.randn(4, 16, 256).unbind(0)
        >>> criterion(q1, q2, k1, k2).shape
        torch.Size([])
    """

    def __init__(self, *, temperature: float = 1.0, gather: bool = True) -> None:
        super().__init__()
        self.temperature = check_positive("temperature", temperature)
        self.gather = check_bool("gather", gather)

    def forward(
        self,
        q1: torch.Tensor,
        q2: torch.Tensor,
        k1: torch.Tensor,
        k2: torch.Tensor,
        *,
        positive_offset: int | None = None,
        group: Group = None,
    ) -> torch.Tensor:
        """Args as [`symmetric_contrastive_loss`][]: queries ``(N, D)``, keys ``(M, D)``;
        ``group`` is the process group to gather the keys over (the whole world by default)."""
        return symmetric_contrastive_loss(
            q1,
            q2,
            k1,
            k2,
            temperature=self.temperature,
            gather=self.gather,
            positive_offset=positive_offset,
            group=group,
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, gather={self.gather}"
