"""The gathers behind ``momentum_contrast.distributed`` (private): host exchanges of
batch layouts over a gloo group, padded device all-gathers, and the checksum-tagged
gather used when every rank's row count is already known."""

from __future__ import annotations

import math
import zlib

import torch
import torch.distributed as dist

_size_groups: dict[int, dist.ProcessGroup] = {}
EQUAL_BATCHES = [False]  # set by distributed.assume_equal_batches


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def size_group() -> dist.ProcessGroup | None:
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


def all_gather_host(values: list[int]) -> list[list[int]]:
    """Every rank's list of host integers (all of the same length), in rank order."""
    local = torch.tensor(values, dtype=torch.long)
    parts = [torch.empty_like(local) for _ in range(_world())]
    dist.all_gather(parts, local, group=size_group())
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
def gather_with_sizes(x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """``concat_all_gather`` that also returns every rank's row count, so that callers
    needing both exchange the sizes once. Every rank checks that all ranks passed the
    same trailing shape and dtype, and raises the same ``ValueError`` if not."""
    x = x.detach()
    if _world() == 1:
        return x, [x.shape[0]]
    if EQUAL_BATCHES[0]:
        sizes = [x.shape[0]] * _world()
        return gather_checked(x, sizes, tag_rows=True), sizes
    rows = all_gather_host(_layout(x))
    if any(row[1:] != rows[0][1:] for row in rows):
        described = "; ".join(f"rank {r}: {_describe(row)}" for r, row in enumerate(rows))
        raise ValueError(
            "concat_all_gather: every rank must pass the same trailing shape and dtype "
            f"(this is rank {_rank()}, {tuple(x.shape)} {x.dtype}); got {described}"
        )
    return _all_gather(x.contiguous(), [row[0] for row in rows]), [row[0] for row in rows]


def gather_checked(x: torch.Tensor, sizes: list[int], tag_rows: bool) -> torch.Tensor:
    """All ranks' rows when every rank's row count is already known (``sizes``), without
    a host exchange: each rank's data travels with a checksum of its trailing shape and
    dtype (and row count when ``tag_rows``), compared on arrival. A mismatch raises
    ``ValueError`` for CPU tensors, and fills a floating result with NaN on a GPU (no
    device read); differing element counts make the collective itself fail."""
    if x.shape[0] != sizes[_rank()]:
        raise ValueError(
            f"x must have {sizes[_rank()]} rows on rank {_rank()} (as at batch_shuffle), "
            f"got {tuple(x.shape)}"
        )
    rows = x.shape[0] if tag_rows else 0
    tag = zlib.crc32(f"{rows}|{tuple(x.shape[1:])}|{x.dtype}".encode())
    longest, width = max(sizes), math.prod(x.shape[1:]) * x.element_size()  # bytes per row
    payload = x.new_zeros((longest * width + 8,), dtype=torch.uint8)
    payload[: x.numel() * x.element_size()] = x.contiguous().reshape(-1).view(torch.uint8)
    payload[-8:] = torch.full((1,), tag, dtype=torch.long, device=x.device).view(torch.uint8)
    out = _all_gather(payload, [payload.shape[0]] * _world()).view(_world(), -1)
    ok = (out[:, -8:].reshape(-1).view(torch.long) == tag).all()
    data = out[:, :-8].reshape(_world(), longest * width)
    data = torch.cat([data[r, : n * width] for r, n in enumerate(sizes)]) if width else data
    gathered = data.reshape(-1).view(x.dtype).reshape(sum(sizes), *x.shape[1:])
    if x.device.type == "cpu":  # a host tensor: reading it synchronises nothing
        if not bool(ok):
            raise ValueError(
                "every rank must pass the same trailing shape and dtype"
                + (" and number of rows (assume_equal_batches)" if tag_rows else "")
                + f"; this is rank {_rank()}, {tuple(x.shape)} {x.dtype}"
            )
    elif gathered.is_floating_point():
        gathered = gathered.masked_fill(~ok, float("nan"))  # visible, on the device, no sync
    return gathered


def _all_gather(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Concatenate every rank's rows; ``sizes[r]`` rows come from rank ``r``."""
    longest = max(sizes)
    if x.shape[0] < longest:  # pad to a common shape; trimmed below
        x = torch.cat([x, x.new_zeros((longest - x.shape[0], *x.shape[1:]))])
    out = x.new_empty((_world() * longest, *x.shape[1:]))
    if dist.get_backend() == "nccl":
        dist.all_gather_into_tensor(out, x)
    else:
        dist.all_gather(list(out.chunk(_world())), x)
    if all(s == longest for s in sizes):
        return out
    return torch.cat([out[r * longest : r * longest + s] for r, s in enumerate(sizes)])
