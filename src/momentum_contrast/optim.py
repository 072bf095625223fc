"""LARS as in MoCo v3: layer-wise trust ratio and weight decay for matrices only."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from momentum_contrast._checks import check_real

__all__ = ["LARS"]

_SETTINGS = ("lr", "weight_decay", "momentum", "trust_coefficient")


def _check_setting(name: str, value: object, where: str = "") -> float:
    """A finite real number >= 0 (NaN, infinities and negatives refused)."""
    v = check_real(f"{where}{name}", value)
    if not (math.isfinite(v) and v >= 0):
        raise ValueError(f"{where}{name} must be a finite number >= 0, got {value}")
    return v


class LARS(Optimizer):
    """SGD with momentum and a layer-wise trust ratio (You et al. 2017), as MoCo v3 uses it.

    For a parameter with more than one dimension: ``g = grad + wd * p``, scaled by
    ``trust_coefficient * ||p|| / ||g||`` (1 when either norm is 0). Biases and norm
    parameters (one dimension) get neither weight decay nor scaling. Then
    ``mu = momentum * mu + g`` and ``p -= lr * mu`` (no dampening, no Nesterov).

    Args:
        params: parameters or parameter groups.
        lr: learning rate, set by your schedule (the MoCo v3 ResNet recipe warms up to
            ``0.6 * batch_size / 256``, then decays it on a half-cosine).
        weight_decay: v3 ResNet uses 1e-6.
        momentum: 0.9 as the reference.
        trust_coefficient: 0.001 as the reference.

    The settings after ``lr`` are keyword-only (``LARS(params, 0.1, 0.9)`` would have made
    0.9 the weight decay). The norms are taken in float32 at least (a float16 one would
    overflow above 65504). Every setting must be a finite real number ``>= 0``, in the
    defaults and in each parameter group (``TypeError`` for a non-number, ``ValueError``
    naming the setting for NaN, an infinity or a negative value). There is no ``eps``: a
    zero norm gives the ratio 1 instead of a division by a small number.

    Examples:
        >>> import torch
        >>> from momentum_contrast.optim import LARS
        >>> model = torch.nn.Linear(4, 2)
        >>> optimizer = LARS(model.parameters(), lr=0.1, weight_decay=1e-6)
        >>> model(torch.randn(8, 4)).sum().backward()
        >>> optimizer.step()
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.0,
        *,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
    ) -> None:
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "trust_coefficient": trust_coefficient,
        }
        for name, value in defaults.items():
            _check_setting(name, value)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group after checking its own settings (those it does not set default)."""
        if isinstance(param_group, dict):
            for name in _SETTINGS:
                if name in param_group:
                    index = len(self.param_groups)
                    _check_setting(name, param_group[name], f"param_groups[{index}] ")
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load after checking every group's settings, as the load pre-hooks left them (a
        migration registered with ``register_load_state_dict_pre_hook`` runs first): each
        present (an SGD state dict has no ``trust_coefficient``) and as the constructor
        requires."""
        handle = self.register_load_state_dict_pre_hook(_check_loaded)  # after the others
        try:
            super().load_state_dict(state_dict)
        finally:
            handle.remove()

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if p.ndim > 1:  # matrices and kernels: decay, then the trust ratio
                    g = g.add(p, alpha=group["weight_decay"])
                    # in float32 at least: a float16 norm above 65504 is inf (ratio 0)
                    wide = torch.promote_types(p.dtype, torch.float32)
                    p_norm = torch.linalg.vector_norm(p, dtype=wide)
                    g_norm = torch.linalg.vector_norm(g, dtype=wide)
                    ratio = group["trust_coefficient"] * p_norm / g_norm
                    ratio = torch.where((p_norm > 0) & (g_norm > 0), ratio, 1.0)
                    g = g.mul(ratio)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(g)
                p.add_(mu, alpha=-group["lr"])
        return loss


def _check_loaded(optimizer: Optimizer, state_dict: dict[str, Any]) -> None:
    """The settings of every group of a state dict about to be loaded (nothing is yet)."""
    for index, group in enumerate(state_dict.get("param_groups", [])):
        where = f"state_dict param_groups[{index}] "
        if missing := [name for name in _SETTINGS if name not in group]:
            raise ValueError(f"{where}has no {', '.join(missing)}: not a LARS state dict")
        for name in _SETTINGS:
            _check_setting(name, group[name], where)
