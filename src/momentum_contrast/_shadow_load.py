"""Load hooks of `MomentumEncoder` for its ``ema_dtype`` copies (private).

* A state dict without ``ema_shadow.*`` (saved without ``ema_dtype``) loads into an
  encoder with it: each copy is seeded from its loaded key weight.
* A state dict with ``ema_shadow.*`` into an encoder without ``ema_dtype`` raises one
  line saying what to do, whatever ``strict`` (torch hands hooks no ``strict``; dropping
  the float32 copies silently would lose the average's precision).
* 0.2.0's names (``ema_shadow.blocks/0/weight``) load as today's (``ema_shadow.blocks.0.weight``).
* Keys and copies loaded together are reconciled once, at load time (eagerly, never in a
  compiled step): a copy is kept where the loaded key is its rounding, so a resumed run
  is exact in any order of casts; elsewhere the key wins.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from momentum_contrast._shadow import ShadowWeights

_SHADOW = "ema_shadow."


def load_pre_hook(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: dict[str, Any],
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    start = prefix + _SHADOW
    if module.ema_dtype is None:
        if any(k.startswith(start) for k in state_dict):
            raise ValueError(
                f"MomentumEncoder: the state dict holds {start}* (float32 copies saved with "
                "ema_dtype=torch.float32); build the MomentumEncoder with "
                "ema_dtype=torch.float32 to resume exactly, or drop those entries to load "
                "the key weights alone"
            )
        return
    for k in [k for k in state_dict if k.startswith(start) and "/" in k[len(start) :]]:
        state_dict[start + k[len(start) :].replace("/", ".")] = state_dict.pop(k)  # 0.2.0
    key_prefixes = (prefix + "key_encoder.", prefix + "key_encoder._orig_mod.")
    loaded: dict[str, tuple[torch.Tensor | None, bool]] = {}  # (the key's tensor, a copy?)
    shadows: ShadowWeights = module.ema_shadow  # type: ignore[assignment]
    for name in shadows.names:
        found = [state_dict.get(p + name) for p in key_prefixes]
        key = next((t for t in found if isinstance(t, torch.Tensor)), None)
        if key is not None or start + name in state_dict:
            loaded[name] = (key, start + name in state_dict)
    module.__dict__["_shadow_loading"] = (prefix, loaded)


def load_post_hook(module: nn.Module, incompatible: Any) -> None:
    loading = module.__dict__.pop("_shadow_loading", None)
    if module.ema_dtype is None or loading is None:
        return
    prefix, loaded = loading
    shadows: ShadowWeights = module.ema_shadow  # type: ignore[assignment]
    keys = dict(module.key_encoder_params())  # type: ignore[operator]
    ordered = [keys[name] for name in shadows.names]
    for i, name in enumerate(shadows.names):
        if name not in loaded:
            continue  # a partial load that left this weight alone: so does its copy
        key, with_copy = loaded[name]
        if with_copy:  # a copy loaded: kept where the loaded key (if any) is its rounding
            saved_dtype = None if key is None else key.dtype
            shadows.follow(i, ordered[i], key is not None, saved_dtype)
            continue
        full = prefix + _SHADOW + name  # a key without its copy (saved without ema_dtype):
        if full in incompatible.missing_keys:  # the copy takes the checkpoint's value, at
            incompatible.missing_keys.remove(full)  # the checkpoint's precision
        shadows.seed(i, ordered[i], key)
    shadows.stamps.record(ordered, shadows.shadows())
