"""The per-pixel work of a view after its crop (private): one function, so that
``torch.compile`` can fuse it when a recipe is built with ``compile=True``."""

from __future__ import annotations

import torch

import momentum_contrast.augment._ops as _ops


def after_crop_stage(
    x: torch.Tensor,
    scale: float,
    gray_mask: torch.Tensor,
    brightness: torch.Tensor,
    contrast: torch.Tensor,
    saturation: torch.Tensor,
    hue: torch.Tensor,
    order: torch.Tensor,
    jitter_mask: torch.Tensor,
    sigma: torch.Tensor | None,
    solarize: torch.Tensor | None,
    mean: torch.Tensor,
    std: torch.Tensor,
    grayscale_first: bool,
    kernel_size: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Everything after the crop: to [0, 1], grayscale and jitter in the recipe's order,
    blur, solarize, normalise."""
    b, _, s, _ = x.shape
    x = (x.to(dtype) * scale).clamp_(0.0, 1.0).expand(b, 3, s, s)  # gray input repeated
    x = colour_stage(
        x, gray_mask, brightness, contrast, saturation, hue, order, jitter_mask, grayscale_first
    )
    if sigma is not None:
        x = _ops.gaussian_blur(x, sigma, kernel_size)
    return finish_stage(x, solarize, mean, std)


def colour_stage(
    x: torch.Tensor,
    gray_mask: torch.Tensor,
    brightness: torch.Tensor,
    contrast: torch.Tensor,
    saturation: torch.Tensor,
    hue: torch.Tensor,
    order: torch.Tensor,
    jitter_mask: torch.Tensor,
    grayscale_first: bool,
) -> torch.Tensor:
    """Random grayscale and colour jitter, in the recipe's order (elementwise work)."""
    if grayscale_first:
        x = torch.where(gray_mask.view(-1, 1, 1, 1), _ops.grayscale(x).expand_as(x), x)
    x = _ops.color_jitter(x, brightness, contrast, saturation, hue, order, jitter_mask)
    if not grayscale_first:
        x = torch.where(gray_mask.view(-1, 1, 1, 1), _ops.grayscale(x).expand_as(x), x)
    return x


def finish_stage(
    x: torch.Tensor, solarize: torch.Tensor | None, mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """Random solarisation, then normalisation."""
    if solarize is not None:
        x = _ops.solarize(x, solarize)
    return _ops.normalize(x, mean, std)
