"""The gathers behind ``momentum_contrast.distributed`` (private; it re-exports the
``is_distributed``, ``rank`` and ``world_size`` defined here): host exchanges of batch
layouts, padded device all-gathers, and the checksum-tagged gather used when every
rank's row count is already known. Every function takes the process group (``None``: the
whole world) and keeps no state: the one thing worth keeping, a gloo group for the host
exchanges of an NCCL group, lives in torch's own registry of process groups."""

from __future__ import annotations

import contextvars
import math
import zlib
from typing import cast

import torch
import torch.distributed as dist

Group = dist.ProcessGroup | None

# set by distributed.assume_equal_batches for its ``with`` block: per thread and task
EQUAL_BATCHES = contextvars.ContextVar("momentum_contrast_equal_batches", default=False)
_HOST_GROUP = "momentum_contrast host exchanges"  # the group_desc of the gloo groups made here


def is_distributed() -> bool:
    """``True`` when ``torch.distributed`` is available and initialised.

    Examples:
        >>> from momentum_contrast.distributed import is_distributed
        >>> is_distributed()
        False
    """
    return dist.is_available() and dist.is_initialized()


def rank(group: Group = None) -> int:
    """This process's rank in ``group`` (the whole world by default), 0 without one;
    -1 (as ``torch.distributed``) in a group it is not a member of.

    Examples:
        >>> from momentum_contrast.distributed import rank
        >>> rank()
        0
    """
    return dist.get_rank(group) if is_distributed() else 0


def world_size(group: Group = None) -> int:
    """Number of processes in ``group`` (the whole world by default), 1 without one;
    -1 (as ``torch.distributed``) on a process that is not a member of ``group``.

    Examples:
        >>> from momentum_contrast.distributed import world_size
        >>> world_size()
        1
    """
    return dist.get_world_size(group) if is_distributed() else 1


def check_member(group: Group) -> None:
    """``ValueError`` where this process is not in ``group`` (torch's collectives would skip
    it with a warning, and ``world_size`` is -1 there): another rank's group was passed."""
    if group is not None and is_distributed() and dist.get_rank(group) < 0:
        given = (  # new_group gives the ranks outside a group a number, -100, not the group
            f"(global ranks {list(members(group))})"
            if isinstance(group, dist.ProcessGroup)
            else f"({group!r}: what new_group returns to the ranks outside the group)"
        )
        raise ValueError(
            f"group: this process (global rank {dist.get_rank()}) is not a member of the group "
            f"given {given}; pass the group this rank belongs to"
        )


def host_group(group: Group) -> Group:
    """A group over ``group``'s ranks that carries CPU tensors: ``group`` itself when it
    has a gloo backend (``"gloo"``, ``"cpu:gloo,cuda:nccl"``, or ``"undefined"``, which
    torch gives a group made without a backend and backs with gloo for CPU tensors when
    they come); for the whole world, a gloo group found in torch's registry or made there
    by the first host exchange (every rank reaches it together). A sub-group with NCCL
    only is refused: made by its members alone, a gloo group would advance torch's count
    of groups on them only, and later groups would get other names on other ranks (a
    hang)."""
    check_member(group)
    backend = str(dist.get_backend(group))
    if "gloo" in backend or backend == "undefined":
        return group
    ranks = dist.get_process_group_ranks(group or dist.group.WORLD)
    if ranks != list(range(dist.get_world_size())):
        raise ValueError(
            f"group: the group of global ranks {ranks} has no gloo backend to exchange batch "
            f"sizes on the host (backend {backend!r}); make it with "
            'dist.new_group(ranks, backend="cpu:gloo,cuda:nccl") (or start the world with '
            'init_process_group("cpu:gloo,cuda:nccl"), which its groups inherit), or gather '
            "under momentum_contrast.distributed.assume_equal_batches() (no host exchange)"
        )
    for pg in list(dist.distributed_c10d._world.pg_group_ranks):  # made for the whole world
        if isinstance(pg, dist.ProcessGroup) and getattr(pg, "group_desc", "") == _HOST_GROUP:
            return pg
    made = dist.new_group(ranks, backend="gloo", group_desc=_HOST_GROUP)
    return cast(dist.ProcessGroup, made)  # every rank is a member: none gets the non-member's -100


def all_gather_host(values: list[int], group: Group = None) -> list[list[int]]:
    """Every rank's list of host integers (all of the same length), in rank order."""
    local = torch.tensor(values, dtype=torch.long)
    parts = [torch.empty_like(local) for _ in range(world_size(group))]
    dist.all_gather(parts, local, group=host_group(group))
    return [p.tolist() for p in parts]  # CPU tensors: no device synchronisation


def members(group: Group) -> tuple[int, ...]:
    """Who is in ``group``, as a tensor may keep it (a group object cannot be copied)."""
    return () if group is None else tuple(dist.get_process_group_ranks(group))


def gather(x: torch.Tensor, group: Group) -> torch.Tensor:
    """``concat_all_gather``: the gather ``batch_unshuffle`` attached to its output when
    ``x`` is that output, unchanged since (version counter, data pointer), else a new one.
    The attached gather is handed over once (and let go): a second call gathers anew.
    In one process there is nothing to gather, and nothing attached to read (a graph
    cannot hold a tensor's ``__dict__``: the push compiles whole)."""
    if world_size(group) == 1:
        return x.detach()
    known = x.__dict__.pop("_moco_gathered", None)
    if known is not None and known[1:] == (x._version, x.data_ptr(), members(group)):
        gathered: torch.Tensor = known[0]
        return gathered
    return gather_with_sizes(x, group)[0]


def gather_with_sizes(x: torch.Tensor, group: Group = None) -> tuple[torch.Tensor, list[int]]:
    """``concat_all_gather`` that also returns every rank's row count, so that callers
    needing both exchange the sizes once. Every rank checks that all ranks passed the
    same trailing shape and dtype, and raises the same ``ValueError`` if not."""
    x = x.detach()
    if world_size(group) == 1:
        return x, [x.shape[0]]
    if EQUAL_BATCHES.get():
        sizes = [x.shape[0]] * world_size(group)
        return gather_checked(x, sizes, group), sizes
    layout = f"(N, {', '.join(map(str, x.shape[1:]))}) {x.dtype}"
    rows = all_gather_host([x.shape[0], zlib.crc32(layout.encode())], group)
    if any(row[1] != rows[0][1] for row in rows):  # every rank sees it: all exchange layouts
        layouts: list[object] = [None] * world_size(group)
        dist.all_gather_object(layouts, layout, group=host_group(group))
        described = "; ".join(f"rank {r}: {text}" for r, text in enumerate(layouts))
        raise ValueError(
            "concat_all_gather: every rank must pass the same trailing shape and dtype "
            f"(this is rank {rank(group)}, {tuple(x.shape)} {x.dtype}); got {described}"
        )
    sizes = [row[0] for row in rows]
    return _all_gather(x.contiguous(), sizes, group), sizes


def gather_checked(x: torch.Tensor, sizes: list[int], group: Group = None) -> torch.Tensor:
    """All ranks' rows when every rank's row count is already known (``sizes``), without
    a host exchange: each rank's data travels with a checksum of its trailing shape and
    dtype (and row count under ``assume_equal_batches``), compared on arrival; a rank
    whose row count is not its ``sizes`` entry sends a wrong checksum (it joins the
    collective: the others would wait for it) and raises after it. A mismatch raises
    ``ValueError`` for CPU tensors, and fills a floating result with NaN on a GPU (no
    device read); differing element counts make the collective itself fail."""
    check_member(group)
    me, n_ranks = rank(group), world_size(group)
    tag_rows = EQUAL_BATCHES.get()
    rows = x.shape[0] if tag_rows else 0
    tag = zlib.crc32(f"{rows}|{tuple(x.shape[1:])}|{x.dtype}".encode())
    other_rows = x.shape[0] != sizes[me]  # known on this rank's host: every rank is told
    longest, width = max(sizes), math.prod(x.shape[1:]) * x.element_size()  # bytes per row
    payload = x.new_zeros((longest * width + 8,), dtype=torch.uint8)
    mine = x.contiguous().reshape(-1).view(torch.uint8)[: longest * width]  # what fits
    payload[: mine.numel()] = mine
    sent = torch.full((1,), tag ^ other_rows, dtype=torch.long, device=x.device)
    payload[-8:] = sent.view(torch.uint8)
    out = _all_gather(payload, [payload.shape[0]] * n_ranks, group).view(n_ranks, -1)
    ok = (out[:, -8:].reshape(-1).view(torch.long) == tag).all()
    data = out[:, :-8].reshape(n_ranks, longest * width)
    data = torch.cat([data[r, : n * width] for r, n in enumerate(sizes)]) if width else data
    gathered = data.reshape(-1).view(x.dtype).reshape(sum(sizes), *x.shape[1:])
    if other_rows:
        raise ValueError(
            f"x must have {sizes[me]} rows on rank {me} (as at batch_shuffle), got {tuple(x.shape)}"
        )
    if x.device.type == "cpu":  # a host tensor: reading it synchronises nothing
        if not bool(ok):
            raise ValueError(
                "every rank must pass the same trailing shape and dtype"
                + (
                    " and number of rows (assume_equal_batches)"
                    if tag_rows
                    else ", and as many rows as it passed to batch_shuffle"
                )
                + f"; this is rank {me}, {tuple(x.shape)} {x.dtype}"
            )
    elif gathered.is_floating_point():
        gathered = gathered.masked_fill(~ok, float("nan"))  # visible, on the device, no sync
    return gathered


def _all_gather(x: torch.Tensor, sizes: list[int], group: Group) -> torch.Tensor:
    """Concatenate every rank's rows; ``sizes[r]`` rows come from rank ``r``."""
    longest, n_ranks = max(sizes), world_size(group)
    if x.shape[0] < longest:  # pad to a common shape; trimmed below
        x = torch.cat([x, x.new_zeros((longest - x.shape[0], *x.shape[1:]))])
    out = x.new_empty((n_ranks * longest, *x.shape[1:]))
    if dist.get_backend(group) == "nccl":
        dist.all_gather_into_tensor(out, x, group=group)
    else:
        dist.all_gather(list(out.chunk(n_ranks)), x, group=group)
    if all(s == longest for s in sizes):
        return out
    return torch.cat([out[r * longest : r * longest + s] for r, s in enumerate(sizes)])
