"""Pair the online model's tensors with the key encoder's by name (private).

Every update walks both models, as timm's and ``AveragedModel``'s updates do (``_walk``:
without building a name), and compares, in one tuple comparison, what it found with what
the previous update found: the names, the tensor objects and where their data lives (a
``.data = ...`` swap, a move or a cast keeps the object but not its memory). When anything
differs, both models are walked by name, checked pair by pair and regrouped, and a real
mismatch raises a ``ValueError`` naming it. No tensor value is read.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from momentum_contrast._dtensor import (
    describe_layout,
    fsdp2_modules,
    is_dtensor,
    local,
    refuse_fsdp1,
)
from momentum_contrast._walk import Named, memo_of, plain, walk

# (key tensors, online tensors, scratch: tensors shaped as the keys, in their dtype, where
# the onlines are narrower; None where they are not)
Group = tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor] | None]
_CHUNK_NUMEL = 1 << 25  # elements of a group, so of its temporaries (128 MB in float32)


@dataclass
class Pairs:
    """One walk's tensors grouped by (device, key dtype, online dtype) in chunks of at most
    ``_CHUNK_NUMEL`` elements, local shards of ``DTensor``s; ``memo`` tells whether a later
    walk found the same."""

    groups: list[Group]
    sharded: bool
    plain: bool = True  # both walks are torch's own (see ``plain``)
    memo: tuple[object, ...] = ()
    held: tuple[torch.Tensor, ...] = ()  # the walked tensors: while held, no id is reused
    onlines: tuple[torch.Tensor, ...] = ()  # the online model's, as walked (not shards)


def current(
    kind: str,
    cached: Pairs | None,
    online: nn.Module,
    key: nn.Module,
    ema_dtype: torch.dtype | None,
) -> Pairs:
    """``cached`` if both walks find what it was built from, else a new, checked pairing
    (eager updates: a compiled one pairs by name, its guards standing for the cache).

    FSDP2 modules left unsharded (a root after a no-grad forward, whose next forward would
    reuse the gathered weights, stale after an update) show other tensors than the sharded
    shards that the update writes: they are resharded (locally, no collective) and the
    models walked again. FSDP1 is refused whenever the pairing is rebuilt."""
    for attempt in range(2):
        shard = local if cached and cached.sharded else None
        memo = cached and memo_of(online, key, kind, shard, cached.plain, cached.memo)[0]
        if cached is not None and memo == cached.memo:
            return cached
        fsdp2 = fsdp2_modules(online, key) if kind == "parameter" and not attempt else []
        if not fsdp2:
            break
        for module in fsdp2:
            module.reshard()
    refuse_fsdp1(online)  # wrapped in FSDP1 after construction: say so
    refuse_fsdp1(key)
    pairs = pair_by_name(kind, walk(online, kind), walk(key, kind), ema_dtype, False)
    if kind == "parameter":  # once per pairing (buffers are paired too, apart)
        warn_if_normalised_otherwise(online, key)
    pairs.plain = plain(online, kind) and plain(key, kind)
    shard = local if pairs.sharded else None
    pairs.memo, pairs.held = memo_of(online, key, kind, shard, pairs.plain)
    return pairs


def warn_if_normalised_otherwise(online: nn.Module, key: nn.Module) -> None:
    """Warn where a BatchNorm of one model takes its statistics over other samples than the
    module of that name in the other (or the other has none there): the tensors pair, but
    ``convert_split_batchnorm`` or ``convert_sync_batchnorm`` run on the online model after
    the copy was taken leaves the key encoder's BatchNorms whole-batch (Shuffle-BN silently
    lost, or v3's SyncBN). Other classes are not compared: torch gives FSDP2, parametrized
    and ``torch.fx`` modules classes of their own on each side."""
    theirs = {name: _statistics(module) for name, module in key.named_modules()}
    if differ := [
        f"{name or 'the model'!r} ({ours or 'no BatchNorm'} online, "
        f"{theirs[name] or 'no BatchNorm'} in the key encoder)"
        for name, m in online.named_modules()
        if name in theirs and (ours := _statistics(m)) != theirs[name]
    ]:
        warnings.warn(
            f"MomentumEncoder: BatchNorms that normalise otherwise: {', '.join(differ[:3])}"
            f"{' ...' * (len(differ) > 3)}. Convert the model before building the "
            "MomentumEncoder (convert_split_batchnorm, convert_sync_batchnorm), or "
            ".key_encoder alike; if the key encoder is meant to differ, ignore this",
            RuntimeWarning,
            stacklevel=6,  # the caller of update() (through no_grad's wrapper)
        )


def _statistics(module: nn.Module) -> str | None:
    """What a BatchNorm takes its statistics over, ``None`` for any other module."""
    if not isinstance(module, _BatchNorm):
        return None
    if isinstance(module, nn.SyncBatchNorm):
        return "all ranks' batch (SyncBatchNorm)"
    splits = getattr(module, "num_splits", 1)  # SplitBatchNorm; 1 is a plain BatchNorm
    return f"{splits} sub-batches (SplitBatchNorm)" if splits != 1 else "its batch (BatchNorm)"


def ema_dtype_problem(names: str, online: torch.dtype, ema_dtype: torch.dtype) -> str | None:
    """Why a key encoder in ``ema_dtype`` cannot follow the floating ``online`` weights
    ``names`` (quoted, comma-separated), or ``None``: it follows weights of its own dtype,
    and bfloat16/float16 ones in float32 (its forward autocasts to them). Float16 for
    bfloat16 weights would turn 1e5 into inf, and float64 for float32 ones has no autocast
    to run them."""
    if online == ema_dtype or (ema_dtype == torch.float32 and online in _LOW):
        return None
    return (
        f"ema_dtype {ema_dtype} cannot follow {names} ({online}): a key encoder in ema_dtype "
        "follows weights of its own dtype, and bfloat16 or float16 weights in torch.float32 "
        "(its forward autocasts to them); use torch.float32 for bfloat16/float16 weights, "
        "else the weights' own dtype"
    )


_LOW = (torch.bfloat16, torch.float16)
_BY_OBJECT = (
    "(under torch.compile ties are told by object: weights sharing memory after a "
    "load_state_dict(assign=True) count as untied; tie them again as objects on both "
    "models, model.b.weight = model.a.weight, or update eagerly)"
)
_ONE_SIDE = (
    "the dtypes differ after a cast of one side alone, or a load_state_dict with assign=True, "
    "which keeps the file's dtype"
)
_KEPT = (
    "a key weight of another dtype than ema_dtype came from outside: a load_state_dict with "
    "assign=True, which keeps the file's dtype (load without it), or a cast of .key_encoder"
)


def _shared(online: Named, key: Named, compiling: bool) -> list[str]:
    """Key tensors living in the memory of an online tensor (an update would average a
    tensor with itself, or write into the online model); compiled, the online tensors
    themselves only (no address can be read)."""

    def storage(t: torch.Tensor) -> object:
        if compiling:
            return None
        t = local(t)
        try:
            address = t.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):  # a subclass without storage
            return None
        return (t.device, address) if address else None  # 0: no memory (meta, empty)

    places = {storage(t) for _, t in online} - {None}
    ids = {id(t) for _, t in online}
    return [n for n, t in key if id(t) in ids or storage(t) in places]


def pair_by_name(
    kind: str, online_named: Named, key_named: Named, ema_dtype: torch.dtype | None, compiling: bool
) -> Pairs:
    """Match tensors by name; raise ``ValueError`` describing every mismatch."""
    online, key = dict(online_named), dict(key_named)
    problems: list[str] = []
    unfollowable: dict[torch.dtype, list[str]] = {}  # names ema_dtype cannot follow, by dtype
    causes: set[str] = set()  # why dtypes differ: one explanation for all the weights
    if missing := [n for n in key if n not in online]:
        problems.append(f"{kind}s missing from the online model: {missing}")
    if added := [n for n in online if n not in key]:
        problems.append(f"{kind}s the key encoder does not have: {added}")
    for name in sorted(key.keys() & online.keys()):
        k, o = key[name], online[name]
        averaged = ema_dtype is not None and o.is_floating_point()
        for what, kv, ov in (
            ("shape", tuple(k.shape), tuple(o.shape)),
            ("dtype", k.dtype, ema_dtype if averaged else o.dtype),
            ("device", k.device, o.device),
            ("layout", describe_layout(k), describe_layout(o)),
        ):
            if kv != ov:
                want = f"{ov} online" if what != "dtype" or ov == o.dtype else f"{ov} (ema_dtype)"
                problems.append(f"{kind} {name!r} has {what} {want} but {kv} in the key encoder")
                if what == "dtype":
                    causes.add(_ONE_SIDE if ov == o.dtype else _KEPT)
        if averaged and ema_dtype_problem(name, o.dtype, ema_dtype):  # type: ignore[arg-type]
            unfollowable.setdefault(o.dtype, []).append(repr(name))
    problems += sorted(causes)
    for dtype, names in unfollowable.items():  # one explanation for all
        problems.append(ema_dtype_problem(", ".join(names), dtype, ema_dtype))  # type: ignore[arg-type]
    if shared := _shared(online_named, key_named, compiling):
        problems.append(
            f"the key encoder shares these {kind}s' memory with the online model (an update "
            f"would average a tensor with itself or write into the online model): {shared}"
        )
    if problems:
        raise ValueError(
            "MomentumEncoder: the online model does not match the key encoder; "
            + "; ".join(problems)
            + ". Move the MomentumEncoder with the model (.to(...)), shard both models "
            "alike (fully_shard with the same mesh), or build a new MomentumEncoder after "
            "changing the model's structure."
        )

    def tie(t: torch.Tensor, side: str) -> object:
        """What tied tensors share: the memory and its layout (ties reloaded with
        ``assign=True`` are other objects, one memory), or the object where there is none
        or where it cannot be read (compiled)."""
        t = local(t)
        if compiling or not t.data_ptr():
            return (side, id(t))
        return (side, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())

    groups: dict[tuple[object, ...], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    partner: dict[object, object] = {}  # a tensor of either side -> its pair
    for name, o in online_named:
        k = key[name]
        tk, to = tie(k, "key"), tie(o, "online")
        if tk in partner or to in partner:  # a tied tensor, seen under another name
            if partner.get(tk) != to or partner.get(to) != tk:
                problems.append(f"{kind} {name!r} is tied to another {kind} on one side only")
                problems += [_BY_OBJECT] * (compiling and _BY_OBJECT not in problems)
            continue
        partner[tk], partner[to] = to, tk
        k, o = local(k), local(o)
        if k.is_complex():  # averaged as (real, imaginary) pairs: no complex32 lerp exists
            k, o = torch.view_as_real(k), torch.view_as_real(o)
        keys, onlines = groups.setdefault((k.device, k.dtype, o.dtype), ([], []))
        keys.append(k)
        onlines.append(o)
    if problems:
        raise ValueError(f"MomentumEncoder: {'; '.join(problems)}")
    if kind == "parameter" and not compiling:  # Dynamo cannot trace it; eager updates do it
        for _, p in key_named:  # a reloaded or replaced key encoder stays frozen
            p.requires_grad_(False)
    sharded = any(is_dtensor(t) for _, t in online_named + key_named)
    chunks = [c for keys, onlines in groups.values() for c in chunked(keys, onlines, compiling)]
    return Pairs(chunks, sharded, onlines=tuple([t for _, t in online_named]))


def chunked(keys: list[torch.Tensor], onlines: list[torch.Tensor], compiling: bool) -> list[Group]:
    """One group in chunks of at most ``_CHUNK_NUMEL`` elements (a larger tensor alone), so
    that an update's temporaries stay bounded. Onlines narrower than the keys (a float32 key
    encoder following bfloat16 weights) get a scratch: views of one buffer, shared by the
    group's chunks, that an update widens them into (arithmetic across dtypes runs tensor by
    tensor; a copy across dtypes and a lerp within one are fused)."""
    numels = [k.numel() for k in keys]
    bounds, size = [0], 0
    for i, numel in enumerate(numels):
        if size and size + numel > _CHUNK_NUMEL:
            bounds.append(i)
            size = 0
        size += numel
    spans = list(zip(bounds, [*bounds[1:], len(keys)], strict=True))
    if compiling or keys[0].dtype == onlines[0].dtype:  # compiled: no scratch, fused anyway
        return [(keys[a:b], onlines[a:b], None) for a, b in spans]
    groups: list[Group] = []
    with torch.inference_mode(False):  # paired in inference mode, updated outside it
        buffer = torch.empty(
            max(sum(numels[a:b]) for a, b in spans), dtype=keys[0].dtype, device=keys[0].device
        )
        for a, b in spans:
            views = torch.split(buffer[: sum(numels[a:b])], numels[a:b])
            scratch = [v.view(k.shape) for v, k in zip(views, keys[a:b], strict=True)]
            groups.append((keys[a:b], onlines[a:b], scratch))
    return groups
