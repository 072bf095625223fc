"""The walk of both models at every update, and what it is compared with (private).

``layout`` walks a model without building a name: each module's class, names of its children
and of its tensors, and the tensors (all that ``named_parameters()`` is made of), in the order
``named_modules()`` visits them. ``memo_of`` puts both models' walks, the tensor objects,
their data addresses and sizes in one tuple that the pairing compares with the previous
update's. Models whose own named walk is something else are walked by name.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

Named = list[tuple[str, torch.Tensor]]


def walk(model: nn.Module, kind: str) -> Named:
    """Every name of every tensor: a tied tensor once per name (the pairing drops repeats)."""
    named = model.named_parameters if kind == "parameter" else model.named_buffers
    return list(named(remove_duplicate=False))


def plain(model: nn.Module, kind: str) -> bool:
    """Whether ``walk`` is made of what ``layout`` reads: no module overrides a named walk
    (as torch's activation-checkpoint wrapper does, or one showing unregistered tensors)
    or holds its names elsewhere than in dicts (TorchScript)."""
    attr = "_parameters" if kind == "parameter" else "_buffers"
    return all(
        isinstance(m._modules, dict)
        and isinstance(getattr(m, attr), dict)
        and all(getattr(type(m), f) is getattr(nn.Module, f) for f in _NAMED_WALKS)
        for m in model.modules()
    )


_NAMED_WALKS = ("named_parameters", "named_buffers", "named_modules", "_named_members")


def layout(
    model: nn.Module, kind: str, most: int = sys.maxsize
) -> tuple[list[object], list[torch.Tensor | None]]:
    """What ``walk`` is made of, at half its host time: every module's class, names of its
    children and of its ``kind`` tensors, and the tensors, visited as ``named_modules()``
    visits them (no string is built, no tensor hashed); ``None`` where a child or a tensor
    is ``None`` (which ``walk`` skips: where it stands tells which name is missing). A walk
    longer than ``most`` matches no earlier one and stops (a module made its own descendant
    would never end)."""
    attr = "_parameters" if kind == "parameter" else "_buffers"
    names: list[object] = []  # classes and tuples of names, None for a child that is None
    found: list[torch.Tensor | None] = []
    stack: list[nn.Module | None] = [model]
    while stack:
        if len(names) > most:
            return [object()], []
        module = stack.pop()
        if module is None:  # a child set to None: no module, as for named_modules()
            names.append(None)
            continue
        own: dict[str, torch.Tensor | None] = getattr(module, attr)
        try:  # its class too: a class changed in place (convert_split_batchnorm) is a change
            names += (type(module), tuple(module._modules), tuple(own))
        except (KeyError, TypeError):  # not dicts (TorchScript): matches no walk, ``plain`` tells
            return [object()], []
        found += own.values()
        stack += reversed(module._modules.values())
    return names, found


def memo_of(
    online: nn.Module,
    key: nn.Module,
    kind: str,
    local: Callable[[torch.Tensor], torch.Tensor] | None,
    plain: bool,
    previous: tuple[Any, ...] = (),
) -> tuple[tuple[object, ...], tuple[torch.Tensor, ...]]:
    """``(memo, tensors)``: what names the tensors of both models (``layout``'s, or the
    named walks' where they are not ``plain``), the tensor objects (by id: `Pairs.held`
    keeps them, so no id is reused), their data addresses and sizes (of ``local(t)`` where
    given: a ``DTensor``'s shard, which FSDP2 may re-pad); and the tensors, the online
    model's first. ``previous``: the memo this one is compared with."""
    if plain:  # no walk longer than the last one (whose name lists ``previous`` holds) matches
        most = [len(names) for names in previous[:2]] if previous else [sys.maxsize] * 2
        (online_names, online_found), (key_names, key_found) = (
            layout(online, kind, most[0]),
            layout(key, kind, most[1]),
        )
    else:  # the models' own named walks (names built; no classes)
        online_named, key_named = walk(online, kind), walk(key, kind)
        online_names, online_found = [n for n, _ in online_named], [t for _, t in online_named]
        key_names, key_found = [n for n, _ in key_named], [t for _, t in key_named]
    tensors = tuple([t for t in online_found + key_found if t is not None])
    data = tuple(map(local, tensors)) if local else tensors
    # a view swapped in at the same address: (16,) -> (1,). Shapes would cost twice as much
    # on the host; a view of the same size, (16,) -> (4, 4), on both sides is averaged as
    # before, except where a scratch has the old shape: torch's shape error (see ema_dtype)
    numels = tuple(map(_numel, data))
    ids = tuple(map(id, (*online_found, *key_found)))  # id(None) where a tensor is None
    addresses = tuple(map(_data_ptr, data))
    return (online_names, key_names, ids, addresses, numels), tensors


_data_ptr, _numel = torch.Tensor.data_ptr, torch.Tensor.numel
