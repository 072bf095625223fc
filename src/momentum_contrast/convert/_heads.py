"""How many attention heads a ViT has: the weights cannot tell, so it is read from a
record (private; used by ``momentum_contrast.convert``).

In order: the ``num_heads`` argument; a live module's attention layers; a checkpoint's
top-level ``num_heads`` (this project's example scripts write it), the ``"__model__"``
record of a converted file, or the architecture name of the MoCo v3 authors' checkpoints
(``arch``: their ``vit_small`` and ``vit_base`` both have 12 heads, where DeiT's and
timm's ViT-S has 6). A record that contradicts the argument is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from momentum_contrast.convert._names import LayoutError
from momentum_contrast.convert._spec import MODEL_KEY, VitFacts

# The MoCo v3 authors' ViTs (their vits.py): architecture name -> attention heads.
AUTHORS_VIT_HEADS = {"vit_small": 12, "vit_base": 12, "vit_conv_small": 12, "vit_conv_base": 12}

UNKNOWN_HEADS = (
    "is a ViT whose number of attention heads is not recorded, and the weights cannot "
    "tell it: give it (num_heads=, or --num-heads of python -m momentum_contrast.convert); "
    "the MoCo v3 authors' ViT-S and ViT-B have 12, DeiT's and timm's ViT-S 6 (as the "
    "example scripts' vit_small up to version 0.2.0)"
)


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def check_num_heads(num_heads: int | None) -> None:
    """``num_heads`` is None or a positive int, else a ``TypeError`` / ``ValueError``."""
    if num_heads is None:
        return
    if _count(num_heads) is None:
        raise TypeError(f"num_heads must be an int, got {type(num_heads).__name__}")
    if num_heads <= 0:
        raise ValueError(f"num_heads must be positive, got {num_heads}")


def recorded_heads(ckpt: Mapping[str, Any]) -> tuple[int, str] | None:
    """``(heads, where it was read)`` from a checkpoint's record, or None."""
    if (n := _count(ckpt.get("num_heads"))) is not None:
        return n, f"its num_heads entry ({n})"
    record = ckpt.get(MODEL_KEY)
    kwargs = record.get("kwargs") if isinstance(record, Mapping) else None
    if isinstance(kwargs, Mapping) and (n := _count(kwargs.get("num_heads"))) is not None:
        return n, f"its {MODEL_KEY!r} record ({n})"
    arch = ckpt.get("arch")
    if isinstance(arch, str) and arch in AUTHORS_VIT_HEADS:
        n = AUTHORS_VIT_HEADS[arch]
        return n, f"its arch {arch!r} (the MoCo v3 authors' {arch} has {n} heads)"
    return None


def module_heads(module: nn.Module, what: str) -> tuple[int, str] | None:
    """``(heads, where)`` from the attention layers of a live module, or None."""
    found = {
        n for m in module.modules() if (n := _count(getattr(m, "num_heads", None))) is not None
    }
    if len(found) > 1:
        raise LayoutError(f"{what}: attention layers with different head counts {sorted(found)}")
    return (found.pop(), "its attention layers") if found else None


def module_facts(module: nn.Module) -> VitFacts:
    """A timm ViT module's pooling, final norm and class-token position row."""
    pool = getattr(module, "global_pool", None)
    fc_norm = getattr(module, "fc_norm", None)
    has_fc_norm = isinstance(fc_norm, nn.Module) and not isinstance(fc_norm, nn.Identity)
    no_embed_class = getattr(module, "no_embed_class", None)
    return VitFacts(
        global_pool=pool if isinstance(pool, str) else None,
        fc_norm=has_fc_norm if isinstance(fc_norm, nn.Module) else None,
        no_embed_class=no_embed_class if isinstance(no_embed_class, bool) else None,
    )


def resolve_heads(
    num_heads: int | None, record: tuple[int, str] | None, dim: int, what: str
) -> int:
    """The head count of a ViT of width ``dim``: the argument, or else the record; a
    ``LayoutError`` when neither exists, a ``ValueError`` when they disagree."""
    if num_heads is not None and record is not None and record[0] != num_heads:
        raise ValueError(f"num_heads={num_heads} contradicts {what}: {record[1]}")
    heads = num_heads if num_heads is not None else record[0] if record is not None else None
    if heads is None:
        raise LayoutError(f"{what} {UNKNOWN_HEADS}")
    if dim % heads:
        raise ValueError(f"num_heads must divide the ViT's width {dim}, got {heads}")
    return heads
