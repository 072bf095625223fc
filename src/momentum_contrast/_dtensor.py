"""FSDP2 and ``DTensor`` helpers of the key-encoder update (private); no-ops without
``torch.distributed``."""

from __future__ import annotations

import sys
from typing import Any

import torch

# FSDP2's public home is torch.distributed.fsdp from torch 2.6 (2.5: ._composable.fsdp)
_FSDP2 = ("torch.distributed.fsdp", "torch.distributed._composable.fsdp")


def _loaded(modules: str | tuple[str, ...], name: str) -> Any:
    """``module.name`` for the first of ``modules`` that the user's program imported and
    that has ``name``, else ``None``.

    Importing FSDP2 or DTensor costs about 0.6 s (it pulls in sympy); without that import
    no FSDP module or DTensor can exist, so this library never imports them itself."""
    for module in (modules,) if isinstance(modules, str) else modules:
        found = getattr(sys.modules.get(module), name, None)
        if found is not None:
            return found
    return None


def fsdp2_modules(*models: torch.nn.Module) -> list[Any]:
    """The modules of ``models`` that FSDP2's ``fully_shard`` sharded."""
    fsdp_module = _loaded(_FSDP2, "FSDPModule")
    if fsdp_module is None:
        return []
    return [m for model in models for m in model.modules() if isinstance(m, fsdp_module)]


def is_dtensor(t: torch.Tensor) -> bool:
    dtensor = _loaded("torch.distributed.tensor", "DTensor")
    return dtensor is not None and isinstance(t, dtensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor an in-place update writes: a DTensor's local shard, else ``t``."""
    return t._local_tensor if is_dtensor(t) else t  # type: ignore[attr-defined]


def describe_layout(t: torch.Tensor) -> str:
    """How ``t`` lies across ranks, as the pairing compares it: a plain tensor, or a
    DTensor's placements and mesh."""
    if not is_dtensor(t):
        return "a plain (unsharded) tensor"
    return f"a DTensor {list(t.placements)} on {t.device_mesh}"  # type: ignore[attr-defined]


def refuse_fsdp1(model: torch.nn.Module) -> None:
    """FSDP1 (``FullyShardedDataParallel``: Lightning's ``strategy="fsdp"``, Accelerate's
    default FSDP plugin) flattens parameters into views that a key encoder cannot pair."""
    fsdp1 = _loaded("torch.distributed.fsdp", "FullyShardedDataParallel")
    if fsdp1 is None:
        return  # never imported: no FSDP1 module can exist
    flat = _loaded("torch.distributed.fsdp._flat_param", "FlatParameter")

    def flattened(t: object) -> bool:  # a view of FSDP1's flat parameter, or its original
        return isinstance(t, torch.Tensor) and (
            getattr(t, "_fsdp_flattened", False) or (flat is not None and isinstance(t._base, flat))
        )

    if any(
        isinstance(m, fsdp1) or any(map(flattened, [*m.__dict__.values(), *m._parameters.values()]))
        for m in model.modules()
    ):
        raise TypeError(
            "MomentumEncoder: FSDP1 (FullyShardedDataParallel) is not supported: shard with "
            "FSDP2 instead (torch.distributed.fsdp.fully_shard; Lightning: "
            "ModelParallelStrategy; Accelerate: fsdp_version=2)"
        )
