"""The dictionary of MoCo v1/v2: a ring buffer of the newest keys."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from momentum_contrast._casts import keeping_dtype
from momentum_contrast._checks import (
    check_bool,
    check_choice,
    check_float_dtype,
    check_float_matrix,
    check_positive_int,
    check_same_device,
    is_integer,
)
from momentum_contrast._collectives import Group, gather

QueueInit = Literal["random", "empty"]

__all__ = ["KeyQueue"]


class KeyQueue(nn.Module):
    """Ring buffer holding the newest ``size`` keys: MoCo's negatives.

    ``push`` writes at a device-side pointer with ``index_copy_``, so it never
    synchronises host and device and takes any batch size (the reference
    asserts ``size % batch_size == 0``). Keys, pointer and length are persistent
    buffers: the queue survives ``state_dict`` round trips, so a resumed run
    continues with the dictionary it had. Once the queue is full (from the start
    with ``init="random"``) ``push`` can be captured in a CUDA graph: the
    pointer advances on the device at every replay.

    Args:
        size: number of keys ``K`` kept (65,536 in the papers), ``>= 1``.
        dim: key dimension ``D`` (128 in the papers), ``>= 1``.
        dtype: storage dtype; ``torch.bfloat16`` / ``torch.float16`` halve the
            memory, and [`info_nce`][] still computes in float32. Kept through casts
            of a parent module (``model.half()``, ``model.to(torch.bfloat16)``,
            Lightning's ``precision="bf16-true"``), which still move the queue between
            devices: choose the dtype here.
        init: ``"random"`` (default, as the papers): full from the start with
            unit-norm random keys, drawn from a generator of their own with a fixed
            seed, so that every rank holds the same ones with no exchange (the
            reference takes rank 0's through DDP), whatever each rank's seed or group,
            and the global random stream is left as it was. ``"empty"``: starts with no
            keys and grows (its length is a host integer: a step under ``torch.compile``
            recompiles at each new length, and past torch's recompile limit runs eagerly, or
            raises under ``fullgraph=True``; compile with ``"random"``); before the first
            ``push`` a loss against ``negatives()`` (``(0, D)``) has no negative to score:
            it is 0, with a zero gradient.
        normalize: L2-normalise every pushed key (the queue then always holds
            unit-norm keys, as ``info_nce`` expects of its negatives).
        gather: when ``torch.distributed`` is initialised, all-gather the keys of
            every rank (in rank order) before writing, so all ranks hold the same queue.

    Examples:
        >>> import torch
        >>> from momentum_contrast import KeyQueue
        >>> queue = KeyQueue(size=1000, dim=128)
        >>> len(queue)
        1000
        >>> negatives = queue.negatives()  # (1000, 128), a snapshot safe for backward
        >>> queue.push(torch.randn(96, 128))  # any batch size; detached and normalised
        >>> queue.negatives().norm(dim=1).allclose(torch.ones(1000))
        True
    """

    keys: torch.Tensor
    ptr: torch.Tensor
    length: torch.Tensor

    def __init__(
        self,
        size: int,
        dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        init: QueueInit = "random",
        normalize: bool = True,
        gather: bool = True,
    ) -> None:
        super().__init__()
        self.size = check_positive_int("size", size)
        self.dim = check_positive_int("dim", dim)
        check_float_dtype("dtype", dtype)
        check_choice("init", init, ("random", "empty"))
        self.normalize = check_bool("normalize", normalize)
        self.gather = check_bool("gather", gather)
        if init == "random":  # the same keys on every rank: no exchange, no global draw
            generator = torch.Generator().manual_seed(0)  # a CPU one: drawn there, then moved
            drawn = torch.randn(self.size, self.dim, generator=generator, device="cpu")
            # the default device (torch 2.5's get_default_device() misses `with torch.device`)
            keys = F.normalize(drawn, dim=1).to(torch.empty(0).device, dtype)
            self._length = self.size
        else:
            keys = torch.zeros(self.size, self.dim, dtype=dtype)
            self._length = 0
        self.register_buffer("keys", keys)  # (K, D)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))  # next write row
        self.register_buffer("length", torch.tensor(self._length, dtype=torch.long))

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:
        return super()._apply(keeping_dtype(fn), recurse)  # type: ignore[no-any-return,no-untyped-call]

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
        # all of the queue's tensors or none: torch would copy ptr and length, then refuse keys
        entries = {n: state_dict.get(prefix + n) for n in ("keys", "ptr", "length")}
        problems = [  # torch would copy the others, then refuse these
            f"{name} of type {type(value).__name__}, not a tensor"
            for name, value in entries.items()
            if value is not None and not isinstance(value, torch.Tensor)
        ]
        keys, ptr, length = (v if isinstance(v, torch.Tensor) else None for v in entries.values())
        if keys is not None and tuple(keys.shape) != (self.size, self.dim):
            problems.append(f"keys of shape {tuple(keys.shape)}, not ({self.size}, {self.dim})")
        for name, value, high in (("ptr", ptr, self.size - 1), ("length", length, self.size)):
            if value is not None and not (  # an integer: a float 2.7 is no row, NaN none at all
                value.shape == () and is_integer(value) and 0 <= int(value) <= high
            ):
                problems.append(f"{name} {value.tolist()!s:.40}, not an int in [0, {high}]")
        if (  # a queue not yet full was filled from row 0 on: its next row is its length
            not problems
            and ptr is not None
            and length is not None
            and int(length) < self.size
            and int(ptr) != int(length)
        ):
            problems.append(f"ptr {int(ptr)} with length {int(length)}: not yet full, a queue's "
                            "next row is its length")  # fmt: skip
        if problems:  # args[-1]: error_msgs, raised by load_state_dict (strict or not)
            where = f"KeyQueue {prefix!r}" if prefix else "KeyQueue"
            args[-1].append(f"{where}: {', '.join(problems)}; nothing of it was loaded")
            return
        super()._load_from_state_dict(state_dict, prefix, *args)
        # Loading is not a steady-state step: one read of the loaded length is fine.
        self._length = int(self.length)

    def __len__(self) -> int:
        """Number of valid keys: ``size`` once full (from the start with ``init="random"``)."""
        return self._length

    @torch.no_grad()
    def push(self, keys: torch.Tensor, *, group: Group = None) -> None:
        """Enqueue a batch of keys, overwriting the oldest.

        Args:
            keys: ``(N, dim)`` float tensor on the queue's device, any ``N``.
                Detached; gathered from all ranks first when ``gather`` and
                ``torch.distributed`` is initialised; L2-normalised when
                ``normalize``. With ``N > size`` only the newest ``size`` are kept.
            group: the process group whose ranks share this queue (a data-parallel
                group); the whole world by default. Pass the same one at every call.
        """
        check_float_matrix("keys", keys, self.dim, "the queue's dim")
        check_same_device("keys", keys, "the queue", self.keys)
        if self.gather:  # (world * N, D); the very keys batch_unshuffle returned: no exchange
            keys = gather(keys, group)
        n = keys.shape[0]
        offset = max(n - self.size, 0)  # rows that would be overwritten at once
        keys = keys[offset:]
        if self.normalize:
            keys = F.normalize(keys.to(torch.promote_types(keys.dtype, torch.float32)), dim=1)
        rows = torch.arange(offset, n, device=self.keys.device).add_(self.ptr).remainder_(self.size)
        self.keys.index_copy_(0, rows, keys.to(self.keys.dtype))  # row g -> slot (ptr + g) % K
        self.ptr.add_(n).remainder_(self.size)
        if self._length < self.size:  # known on the host: no read of the device
            self._length = min(self._length + n, self.size)
            self.length.fill_(self._length)

    def negatives(self) -> torch.Tensor:
        """The valid keys, as a copy that a later [`push`][] cannot change.

        The copy is an operator of this library's (``momentum_contrast::copy_rows``), which
        compiles with ``fullgraph=True`` and which no compiler elides: inductor elided a
        ``clone`` and saved the queue's keys themselves for the backward, so that a
        ``push`` before ``backward()`` made the gradients wrong (the push in the same
        graph) or raised autograd's "modified by an inplace operation" (the push after).

        Returns:
            ``(len(self), dim)`` tensor in the storage dtype, without gradient.
            It is a snapshot (as the reference's ``queue.clone()``), so a loss
            built from it backpropagates correctly even after the next ``push``.
        """
        snapshot: torch.Tensor = _copy_rows(self.keys.detach(), self._length)  # (len(self), D)
        return snapshot

    def extra_repr(self) -> str:
        return (
            f"size={self.size}, dim={self.dim}, dtype={self.keys.dtype}, "
            f"normalize={self.normalize}, gather={self.gather}"
        )


@torch.library.custom_op("momentum_contrast::copy_rows", mutates_args=())
def _copy_rows(keys: torch.Tensor, rows: int) -> torch.Tensor:
    """``keys[:rows]``, copied in an operator of its own: compiled, inductor would elide a
    plain ``clone`` and save the queue's keys for the backward (see ``KeyQueue.negatives``)."""
    return keys[:rows].clone()


@_copy_rows.register_fake
def _(keys: torch.Tensor, rows: int) -> torch.Tensor:
    return keys.new_empty(rows, keys.shape[1])
