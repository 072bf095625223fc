"""Cross-process pieces of MoCo on ``torch.distributed``; single-process without it.

Every function is safe to call whether or not a process group is initialised.
Without one, ``rank() == 0``, ``world_size() == 1``, ``concat_all_gather(x)``
returns ``x`` detached, and ``batch_shuffle`` permutes the local batch (so that
with [`SplitBatchNorm`][momentum_contrast.norm.SplitBatchNorm] one device gets
Shuffle-BN). Every collective takes ``group=``: a process group (the data-parallel
group of a DP x TP or HSDP job), the whole world by default; ranks are then the ranks
in that group.

Ranks may hold batches of different sizes (a last batch that does not divide
evenly): the sizes are exchanged as host integers over a CPU (gloo) group, never
read back from the GPU, and the gathers pad and trim accordingly. A group with a gloo
backend carries them itself (``"gloo"``, ``"cpu:gloo,cuda:nccl"``, or the one torch
gives when ``init_process_group`` names none; ``new_group`` inherits it). A whole world
with NCCL only gets a gloo twin at its first exchange, kept in torch's registry of
process groups (so it goes with ``destroy_process_group``). A sub-group with NCCL only
is refused with a ``ValueError`` at its first host exchange: its members alone would
make its twin, and torch names later groups by a count that would then differ across
ranks (a hang); make it with ``backend="cpu:gloo,cuda:nccl"`` or gather under
[`assume_equal_batches`][]. A group this process is not in is refused too. The rows of
every gather are in rank order, so all ranks see the same concatenation.

Host collectives: one per MoCo v2 step, one per v3 step (from three and two). A
gather exchanges (rows, trailing shape, dtype) over gloo first; [`batch_unshuffle`][]
reuses the row counts of its [`batch_shuffle`][] and checks the trailing shape and
dtype through a checksum sent with the data (a mismatch raises on CPU tensors and gives
NaN on a GPU; rows of another size in bytes, a wider dtype or trailing shape on one rank,
make the collective itself fail: gloo aborts the process, NCCL errors or times out); a
``KeyQueue.push`` of the keys it returned reuses its gather; the MoCo
v3 loss gathers both views' keys at once. Under [`assume_equal_batches`][] there is no
host exchange at all.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Iterator

import torch
import torch.distributed as dist

import momentum_contrast._collectives as c
from momentum_contrast._checks import check_same_device
from momentum_contrast._collectives import EQUAL_BATCHES, Group, is_distributed, rank, world_size
from momentum_contrast._ddp import exclude_from_ddp

__all__ = [
    "assume_equal_batches",
    "batch_shuffle",
    "batch_unshuffle",
    "concat_all_gather",
    "exclude_from_ddp",
    "gather_sizes",
    "is_distributed",
    "rank",
    "world_size",
]


@contextlib.contextmanager
def assume_equal_batches() -> Iterator[None]:
    """Inside: every gather trusts that all ranks pass the same shape and dtype.

    No host exchange of batch sizes (zero gloo collectives per step), one device
    all-gather per gather. The promise is still checked, without reading the device:
    each rank's data travels with a checksum of its shape and dtype; a mismatch raises
    ``ValueError`` for CPU tensors and turns a floating result into NaN on a GPU (a
    loss that visibly breaks). Ranks with different element counts make the
    collective itself fail (gloo aborts, NCCL errors or times out). Use it when every
    rank's batch has the same size (``drop_last=True``), not for a last uneven batch.
    The setting belongs to the ``with`` block of this thread (or asyncio task) only.

    Examples:
        >>> import torch
        >>> from momentum_contrast.distributed import assume_equal_batches, concat_all_gather
        >>> with assume_equal_batches():
        ...     concat_all_gather(torch.ones(4, 2)).shape
        torch.Size([4, 2])
    """
    token = EQUAL_BATCHES.set(True)
    try:
        yield
    finally:
        EQUAL_BATCHES.reset(token)


def gather_sizes(n: int, *, group: Group = None) -> list[int]:
    """Every rank's ``n`` (a host integer, e.g. its batch size), in rank order.

    Exchanged over a CPU group, so it never waits for the GPU.

    Examples:
        >>> from momentum_contrast.distributed import gather_sizes
        >>> gather_sizes(32)
        [32]
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    if world_size(group) == 1:
        return [int(n)]
    return [int(row[0]) for row in c.all_gather_host([int(n)], group)]


@torch.no_grad()
def concat_all_gather(x: torch.Tensor, *, group: Group = None) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0, in rank order, without gradient.

    Ranks may pass different numbers of rows, but the same trailing shape and dtype:
    otherwise every rank raises the same ``ValueError`` listing each rank's shape
    (they are exchanged with the row counts, in the same host all-gather). The keys
    [`batch_unshuffle`][] just returned carry their gather: it is reused (see there).

    Args:
        x: ``(N_r, ...)`` tensor on rank ``r``.
        group: the process group to gather over; the whole world by default.

    Returns:
        ``(sum_r N_r, ...)`` tensor, rank 0's rows first; ``x.detach()`` when not
        distributed.

    Examples:
        >>> import torch
        >>> from momentum_contrast.distributed import concat_all_gather
        >>> concat_all_gather(torch.ones(4, 2)).shape
        torch.Size([4, 2])
    """
    return c.gather(_check_batch(x), group)


@torch.no_grad()
def batch_shuffle(
    x: torch.Tensor, generator: torch.Generator | None = None, *, group: Group = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle-BN, step one: give each rank a random sub-batch drawn from all ranks.

    The permutation of the gathered batch is drawn on rank 0 and broadcast, so it is
    the same on every rank; rank ``r`` keeps as many rows as it passed in. Without a
    process group the local batch is permuted. Run the key encoder on the result,
    then restore the order with [`batch_unshuffle`][]. No gradient flows through.

    Args:
        x: ``(N_r, ...)`` batch on this rank.
        generator: random generator for the permutation (used on rank 0), on ``x``'s
            device; the global one by default.
        group: the process group to shuffle across; the whole world by default. In a
            DP x TP job (the data-parallel group), the tensor-parallel peers must draw
            the same permutation in their groups: seed them alike, or pass a
            ``generator`` seeded alike on every rank.

    Returns:
        ``(x_shuffled, idx_unshuffle)``: ``(N_r, ...)`` rows for this rank, and the
        ``(sum_r N_r,)`` inverse permutation to pass to [`batch_unshuffle`][] (it carries
        every rank's row count, so that the unshuffle exchanges none).

    Examples:
        >>> import torch
        >>> from momentum_contrast.distributed import batch_shuffle, batch_unshuffle
        >>> x = torch.arange(6.0).unsqueeze(1)
        >>> shuffled, idx = batch_shuffle(x)
        >>> torch.equal(batch_unshuffle(shuffled * 10, idx), x * 10)
        True
    """
    _check_batch(x)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            "generator must be a torch.Generator or None, got "
            f"{type(generator).__module__}.{type(generator).__qualname__}"
        )
    gathered, sizes = c.gather_with_sizes(x, group)  # (sum N_r, ...)
    n = gathered.shape[0]  # generator=None given explicitly makes Dynamo fix n
    if generator is None:
        perm = torch.randperm(n, device=x.device)
    else:
        perm = torch.randperm(n, device=x.device, generator=generator)
    if world_size(group) > 1:
        dist.broadcast(
            perm, src=0 if group is None else dist.get_global_rank(group, 0), group=group
        )
    start = sum(sizes[: rank(group)])
    idx_unshuffle = torch.argsort(perm)
    idx_unshuffle._moco_sizes = (sizes, c.members(group))  # type: ignore[attr-defined]
    return gathered[perm[start : start + x.shape[0]]], idx_unshuffle


@torch.no_grad()
def batch_unshuffle(
    x: torch.Tensor, idx_unshuffle: torch.Tensor, *, group: Group = None
) -> torch.Tensor:
    """Shuffle-BN, step two: undo [`batch_shuffle`][] on the key encoder's output.

    It gathers every rank's rows, with the row counts [`batch_shuffle`][] exchanged (no
    second host exchange). Under a process group the tensor it returns carries that gather
    in the original order: the first [`concat_all_gather`][] of it over the same group (a
    ``KeyQueue.push``) takes it, unless the tensor was changed in place since (its version
    counter and data pointer tell), so the push costs no second exchange. Edit the keys on
    every rank alike or on none: a rank whose keys changed gathers anew, a collective the
    others do not join. Like autograd's own checks,
    writes through ``.data`` are not seen: edit the keys in place with ordinary ops (or
    ``.clone()`` them first).

    Args:
        x: ``(N_r, ...)`` output computed on this rank's shuffled sub-batch.
        idx_unshuffle: the ``(sum_r N_r,)`` index returned by [`batch_shuffle`][].
        group: the process group of the [`batch_shuffle`][]; the whole world by default.

    Returns:
        ``(N_r, ...)``: row ``i`` is the output for this rank's original row ``i``.

    Examples:
        >>> import torch
        >>> from momentum_contrast.distributed import batch_shuffle, batch_unshuffle
        >>> key_encoder = torch.nn.Linear(3, 2)
        >>> x = torch.randn(8, 3)
        >>> shuffled, idx = batch_shuffle(x)
        >>> keys = batch_unshuffle(key_encoder(shuffled), idx)  # (8, 2), rows of x again
        >>> torch.allclose(keys, key_encoder(x))
        True
    """
    _check_batch(x)
    if not isinstance(idx_unshuffle, torch.Tensor) or idx_unshuffle.dtype != torch.long:
        is_tensor = isinstance(idx_unshuffle, torch.Tensor)
        got = idx_unshuffle.dtype if is_tensor else type(idx_unshuffle).__name__
        raise TypeError(
            f"idx_unshuffle must be the torch.long tensor returned by batch_shuffle, got {got}"
        )
    check_same_device("idx_unshuffle", idx_unshuffle, "x", x)
    known = getattr(idx_unshuffle, "_moco_sizes", None)
    if known is not None and known[1] == c.members(group) and world_size(group) > 1:
        sizes = known[0]  # from batch_shuffle: no host exchange
        gathered = c.gather_checked(x.detach(), sizes, group)
    else:
        gathered, sizes = c.gather_with_sizes(x, group)  # rows in shuffled order
    if idx_unshuffle.shape != (sum(sizes),):
        raise ValueError(
            f"idx_unshuffle must have shape ({sum(sizes)},) (all ranks' rows, this rank's x "
            f"holding {x.shape[0]}), got {tuple(idx_unshuffle.shape)}: pass the output of the "
            "batch_shuffle that returned it, with as many rows as its input"
        )
    start = sum(sizes[: rank(group)])
    mine = gathered[idx_unshuffle[start : start + x.shape[0]]]
    # all ranks' rows in their original order: what concat_all_gather(mine) (a queue push
    # of these keys) would gather. Inference tensors have no version counter to tell an
    # in-place edit: nothing is kept for them.
    if world_size(group) > 1 and not mine.is_inference():
        gathered_in_order = gathered[idx_unshuffle]
        mine._moco_gathered = (gathered_in_order, mine._version, mine.data_ptr(), c.members(group))  # type: ignore[attr-defined]
    return mine


def _check_batch(x: object) -> torch.Tensor:
    """A tensor with a batch dimension (rows to gather or shuffle)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (N, ...), got a 0-d tensor")
    return x
