"""Cross-process pieces of MoCo on ``torch.distributed``; single-process without it.

Every function is safe to call whether or not a process group is initialised.
Without one, ``rank() == 0``, ``world_size() == 1``, ``concat_all_gather(x)``
returns ``x`` detached, and ``batch_shuffle`` permutes the local batch (so that
with [`SplitBatchNorm`][momentum_contrast.norm.SplitBatchNorm] one device gets
Shuffle-BN).

Ranks may hold batches of different sizes (a last batch that does not divide
evenly): the sizes are exchanged as host integers over a CPU (gloo) group, never
read back from the GPU, and the gathers pad and trim accordingly. The rows of
every gather are in rank order, so all ranks see the same concatenation.
"""

from __future__ import annotations

import zlib

import torch
import torch.distributed as dist

from momentum_contrast._checks import check_same_device

__all__ = [
    "batch_shuffle",
    "batch_unshuffle",
    "concat_all_gather",
    "gather_sizes",
    "is_distributed",
    "rank",
    "world_size",
]

_size_groups: dict[int, dist.ProcessGroup] = {}


def is_distributed() -> bool:
    """``True`` when ``torch.distributed`` is available and initialised.

    Examples:
        >>> from momentum_contrast.distributed import is_distributed
        >>> is_distributed()
        False
    """
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the default group, 0 without one.

    Examples:
        >>> from momentum_contrast.distributed import rank
        >>> rank()
        0
    """
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes in the default group, 1 without one.

    Examples:
        >>> from momentum_contrast.distributed import world_size
        >>> world_size()
        1
    """
    return dist.get_world_size() if is_distributed() else 1


def _size_group() -> dist.ProcessGroup | None:
    """A gloo group for exchanging host integers (the default group if it is gloo)."""
    if dist.get_backend() == "gloo":
        return None  # the default group
    key = id(dist.distributed_c10d._get_default_group())
    if key not in _size_groups:
        group = dist.new_group(backend="gloo")  # collective: all ranks, first gather only
        if not isinstance(group, dist.ProcessGroup):
            raise RuntimeError("could not create a gloo group to exchange batch sizes")
        _size_groups[key] = group
    return _size_groups[key]


def gather_sizes(n: int) -> list[int]:
    """Every rank's ``n`` (a host integer, e.g. its batch size), in rank order.

    Exchanged over a CPU group, so it never waits for the GPU.

    Examples:
        >>> from momentum_contrast.distributed import gather_sizes
        >>> gather_sizes(32)
        [32]
    """
    if world_size() == 1:
        return [int(n)]
    return [int(row[0]) for row in _all_gather_host([int(n)])]


def _all_gather_host(values: list[int]) -> list[list[int]]:
    """Every rank's list of host integers (all of the same length), in rank order."""
    local = torch.tensor(values, dtype=torch.long)
    parts = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(parts, local, group=_size_group())
    return [p.tolist() for p in parts]  # CPU tensors: no device synchronisation


_SHOWN_DIMS = 6  # trailing dimensions exchanged verbatim (the rest only through a checksum)
_DTYPES = sorted({v for v in vars(torch).values() if isinstance(v, torch.dtype)}, key=str)


def _layout(x: torch.Tensor) -> list[int]:
    """Rows, a checksum of (dtype, trailing shape), then dtype and trailing dims for messages."""
    tail = tuple(x.shape[1:])
    checksum = zlib.crc32(f"{x.dtype}|{tail}".encode())
    shown = list(tail[:_SHOWN_DIMS]) + [-1] * (_SHOWN_DIMS - min(len(tail), _SHOWN_DIMS))
    return [x.shape[0], checksum, _DTYPES.index(x.dtype), len(tail), *shown]


def _describe(row: list[int]) -> str:
    ndim, dims = row[3], [d for d in row[4:] if d >= 0]
    shape = "(N, " + ", ".join(map(str, dims)) + (", ...)" if ndim > _SHOWN_DIMS else ")")
    return f"{shape} {_DTYPES[row[2]]}"


@torch.no_grad()
def _gather_with_sizes(x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """[`concat_all_gather`][] that also returns every rank's row count, so that callers
    needing both exchange the sizes once. Every rank checks that all ranks passed the
    same trailing shape and dtype, and raises the same ``ValueError`` if not."""
    x = x.detach()
    if world_size() == 1:
        return x, [x.shape[0]]
    rows = _all_gather_host(_layout(x))
    if any(row[1:] != rows[0][1:] for row in rows):
        described = "; ".join(f"rank {r}: {_describe(row)}" for r, row in enumerate(rows))
        raise ValueError(
            "concat_all_gather: every rank must pass the same trailing shape and dtype "
            f"(this is rank {rank()}, {tuple(x.shape)} {x.dtype}); got {described}"
        )
    return _all_gather(x.contiguous(), [row[0] for row in rows]), [row[0] for row in rows]


def _all_gather(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Concatenate every rank's rows; ``sizes[r]`` rows come from rank ``r``."""
    longest = max(sizes)
    if x.shape[0] < longest:  # pad to a common shape; trimmed below
        x = torch.cat([x, x.new_zeros((longest - x.shape[0], *x.shape[1:]))])
    out = x.new_empty((world_size() * longest, *x.shape[1:]))
    if dist.get_backend() == "nccl":
        dist.all_gather_into_tensor(out, x)
    else:
        dist.all_gather(list(out.chunk(world_size())), x)
    if all(s == longest for s in sizes):
        return out
    return torch.cat([out[r * longest : r * longest + s] for r, s in enumerate(sizes)])


@torch.no_grad()
def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0, in rank order, without gradient.

    Ranks may pass different numbers of rows, but the same trailing shape and dtype:
    otherwise every rank raises the same ``ValueError`` listing each rank's shape
    (they are exchanged with the row counts, in the same host all-gather).

    Args:
        x: ``(N_r, ...)`` tensor on rank ``r``.

    Returns:
        ``(sum_r N_r, ...)`` tensor, rank 0's rows first; ``x.detach()`` when not
        distributed.

    Examples:
        >>> import torch
        >>> from momentum_contrast.distributed import concat_all_gather
        >>> concat_all_gather(torch.ones(4, 2)).shape
        torch.Size([4, 2])
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (N, ...), got a 0-d tensor")
    return _gather_with_sizes(x)[0]


@torch.no_grad()
def batch_shuffle(
    x: torch.Tensor, generator: torch.Generator | None = None
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

    Returns:
        ``(x_shuffled, idx_unshuffle)``: ``(N_r, ...)`` rows for this rank, and the
        ``(sum_r N_r,)`` inverse permutation to pass to [`batch_unshuffle`][].

    Examples:
        >>> import torch
        >>> from momentum_contrast.distributed import batch_shuffle, batch_unshuffle
        >>> x = torch.arange(6.0).unsqueeze(1)
        >>> shuffled, idx = batch_shuffle(x)
        >>> torch.equal(batch_unshuffle(shuffled * 10, idx), x * 10)
        True
    """
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        raise TypeError(f"x must be a torch.Tensor with a batch dimension, got {x!r:.40}")
    gathered, sizes = _gather_with_sizes(x)  # (sum N_r, ...)
    perm = torch.randperm(gathered.shape[0], device=x.device, generator=generator)
    if world_size() > 1:
        dist.broadcast(perm, src=0)
    start = sum(sizes[: rank()])
    return gathered[perm[start : start + x.shape[0]]], torch.argsort(perm)


@torch.no_grad()
def batch_unshuffle(x: torch.Tensor, idx_unshuffle: torch.Tensor) -> torch.Tensor:
    """Shuffle-BN, step two: undo [`batch_shuffle`][] on the key encoder's output.

    Args:
        x: ``(N_r, ...)`` output computed on this rank's shuffled sub-batch.
        idx_unshuffle: the ``(sum_r N_r,)`` index returned by [`batch_shuffle`][].

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
    if not isinstance(idx_unshuffle, torch.Tensor) or idx_unshuffle.dtype != torch.long:
        raise TypeError("idx_unshuffle must be the long tensor returned by batch_shuffle")
    check_same_device("idx_unshuffle", idx_unshuffle, "x", x)
    gathered, sizes = _gather_with_sizes(x)  # rows in shuffled order
    if idx_unshuffle.shape != (sum(sizes),):
        raise ValueError(
            f"idx_unshuffle must have shape ({sum(sizes)},) (all ranks' rows), "
            f"got {tuple(idx_unshuffle.shape)}"
        )
    start = sum(sizes[: rank()])
    return gathered[idx_unshuffle[start : start + x.shape[0]]]
