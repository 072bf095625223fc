"""The moving-average kernel of `MomentumEncoder.update` (private).

``lerp_`` does ``key += w * (online - key)`` for lists of tensors, ``w = 1 - m``, in the
keys' dtype (the increment alone is rounded, as in a lerp: ``m * key + w * online`` would
round the whole key twice a step):

* onlines narrower than the keys (a float32 key encoder following a bfloat16 model) are
  first widened into a scratch of the keys' dtype: one fused copy, where arithmetic across
  dtypes would run tensor by tensor;
* a Python float ``w``: one fused ``torch._foreach_lerp_``;
* a 0-d tensor ``w`` on the parameters' device (a momentum schedule replayed in a CUDA
  graph; ``_foreach_lerp_`` would read a tensor weight back to the host):
  ``d = online - key; d *= w; key += d`` with fused multi-tensor ops, the scalar staying
  on the device. ``d`` is a temporary of one group, and the pairing cuts groups into
  chunks of bounded size, so a large model never needs a second full copy;
* under ``torch.compile``: one plain expression per tensor, which the compiler fuses and
  which keeps a momentum that changes every step a graph input (a foreach scalar would
  be specialised, recompiling at every new value). Every new value is computed before any
  is written: the compiled pairing tells ties by object only, and tied weights that are
  separate objects sharing one memory on both sides (after ``load_state_dict(assign=True)``
  of both models) then get the same new value twice instead of two steps.
"""

from __future__ import annotations

import torch

from momentum_contrast._checks import check_unit_interval


def check_momentum(value: object, devices: set[torch.device]) -> float | torch.Tensor:
    """A float in [0, 1], or a 0-d floating tensor on the parameters' device.

    The tensor's value is not read (that would synchronise): the caller keeps it in
    [0, 1]."""
    if not isinstance(value, torch.Tensor):
        return check_unit_interval("momentum", value)
    if value.dim() != 0:
        raise ValueError(
            f"momentum must be a float or a 0-d tensor, got shape {tuple(value.shape)}"
        )
    if not value.is_floating_point():
        raise TypeError(f"momentum must be a floating-point tensor, got dtype {value.dtype}")
    if torch.finfo(value.dtype).eps > torch.finfo(torch.float32).eps:
        raise TypeError(  # bfloat16(0.999) == 1.0: the average would never move
            f"momentum must be a float32 or float64 tensor, got {value.dtype}, which cannot "
            "hold 1 - m precisely"
        )
    if wrong := devices - {value.device}:
        raise ValueError(
            f"momentum must be on the parameters' device {next(iter(wrong))}, got {value.device}"
        )
    return value


def lerp_(
    keys: list[torch.Tensor],
    onlines: list[torch.Tensor],
    weight: float | torch.Tensor,
    scratch: list[torch.Tensor] | None = None,
) -> None:
    """``key += weight * (online - key)`` for every pair, in the keys' dtype (the onlines
    of one call share a dtype, the keys' or a narrower one with a ``scratch`` shaped as the
    keys in their dtype, as the pairing groups them)."""
    if torch.compiler.is_compiling():
        pairs = list(zip(keys, onlines, strict=True))
        new = [key + (online.to(key.dtype) - key) * weight for key, online in pairs]
        for key, value in zip(keys, new, strict=True):  # no write before the last read
            key.copy_(value)
        return
    if scratch is not None:  # widened: one dtype from here on
        torch._foreach_copy_(scratch, onlines)
        onlines = scratch
    if isinstance(weight, float):
        torch._foreach_lerp_(keys, onlines, weight)
    else:
        diff = torch._foreach_sub(onlines, keys)  # (online - key)
        torch._foreach_mul_(diff, weight)  # a 0-d device tensor: stays on the device
        torch._foreach_add_(keys, diff)
