"""Batched image operations with per-sample parameters, in pure torch.

Images are float ``(B, C, H, W)`` tensors in ``[0, 1]`` (``C`` = 3, or 1 where noted);
per-sample parameters are ``(B,)`` tensors on the same device. Each op computes
the same result as ``torchvision.transforms.v2.functional`` applied to every
sample with its own parameter, without a Python loop over the batch.

Every op checks its arguments' types, dtypes and shapes: an integer (other than
``uint8``, which ``resized_crop`` takes), bool or complex image is a ``TypeError``
naming the argument and its dtype. The ops whose result is clamped to (or inverted
within) ``[0, 1]`` (the four ``adjust_*``, ``color_jitter``, ``solarize`` and
``resized_crop``) also refuse float images with values outside ``[0, 1]`` (or NaN),
and ``resized_crop`` refuses boxes outside their image, with a
``ValueError``, where reading the values is free: for tensors on the CPU, outside
``torch.compile``. So are the parameters torchvision refuses: a negative or non-finite
factor or ``sigma``, a hue shift outside ``[-0.5, 0.5]``, a ``std`` of 0 (or not finite), a
``threshold`` outside ``[0, 1]``. On a GPU the values are not read, because that would make the host
wait for the device (the library never does in a training step); there, out-of-range
pixels are clamped like any other, and a box outside its image gives NaN for that sample.

Examples:
    >>> import torch
    >>> from momentum_contrast.augment import functional as AF
    >>> x = torch.rand(4, 3, 32, 32)
    >>> y = AF.adjust_brightness(x, torch.tensor([0.5, 1.0, 1.2, 1.4]))
    >>> y.shape, bool(y.max() <= 1)
    (torch.Size([4, 3, 32, 32]), True)
"""

from __future__ import annotations

import math

import torch

import momentum_contrast.augment._ops as _ops
from momentum_contrast._checks import (
    check_bool,
    check_float_dtype,
    check_positive_int,
    check_unit_interval,
)
from momentum_contrast.augment._checks import (
    as_batch,
    check_boxes,
    check_images,
    check_mask,
    check_order,
    check_values,
    check_vector,
)

__all__ = [
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "color_jitter",
    "gaussian_blur",
    "grayscale",
    "hflip",
    "normalize",
    "resized_crop",
    "solarize",
]


def _per_sample(
    factor: torch.Tensor, x: torch.Tensor, name: str, low: float = 0.0, high: float = math.inf
) -> torch.Tensor:
    """A real ``(B,)`` tensor as ``(B, 1, 1, 1)`` in ``x``'s dtype, the values in
    ``[low, high]`` where reading them is free (``check_values``)."""
    check_values(name, check_vector(name, factor, x), low, high)
    return factor.to(x.dtype).view(-1, 1, 1, 1)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma ``0.2989 R + 0.587 G + 0.114 B``: ``(B, 3, H, W)`` -> ``(B, 1, H, W)``.

    Examples:
        >>> import torch
        >>> from momentum_contrast.augment.functional import grayscale
        >>> grayscale(torch.ones(2, 3, 4, 4)).shape
        torch.Size([2, 1, 4, 4])
    """
    gray = _ops.grayscale(check_images("x", x))
    return gray.clone() if gray is x else gray  # one channel: a copy, never the input


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``clamp(x * factor, 0, 1)`` per sample; ``factor``: ``(B,)``.

    Examples:
        >>> import torch
        >>> from momentum_contrast.augment.functional import adjust_brightness
        >>> adjust_brightness(torch.full((2, 3, 4, 4), 0.5), torch.tensor([0.5, 3.0]))[:, 0, 0, 0]
        tensor([0.2500, 1.0000])
    """
    x = check_images("x", x, in_unit_range=True)
    return (x * _per_sample(factor, x, "factor")).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend each image with its mean luma: ``clamp(f * x + (1 - f) * mean)``.

    Examples:
        >>> import torch
        >>> from momentum_contrast.augment.functional import adjust_contrast
        >>> x = torch.rand(2, 3, 4, 4)
        >>> flat = adjust_contrast(x, torch.zeros(2))  # factor 0: every pixel = the mean luma
        >>> bool((flat == flat[:, :1, :1, :1]).all())
        True
    """
    f = _per_sample(factor, check_images("x", x, in_unit_range=True), "factor")
    mean = _ops.grayscale(x).mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    return (f * x + (1 - f) * mean).clamp_(0.0, 1.0)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend each image with its own grayscale version (no-op for 1 channel).

    Examples:
        >>> import torch
        >>> from momentum_contrast.augment.functional import adjust_saturation
        >>> gray = adjust_saturation(torch.rand(2, 3, 4, 4), torch.zeros(2))  # factor 0: grayscale
        >>> torch.allclose(gray[:, 0], gray[:, 1])
        True
    """
    f = _per_sample(factor, check_images("x", x, in_unit_range=True), "factor")
    if x.shape[1] == 1:
        return x
    return (f * x + (1 - f) * _ops.grayscale(x)).clamp_(0.0, 1.0)


def adjust_hue(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by ``factor`` turns (``(B,)`` in ``[-0.5, 0.5]``), via HSV.

    Examples:
        >>> import torch
        >>> from momentum_contrast.augment.functional import adjust_hue
        >>> red = torch.zeros(1, 3, 2, 2); red[:, 0] = 1.0
        >>> adjust_hue(red, torch.tensor([1 / 3]))[0, :, 0, 0]  # a third of a turn: green
        tensor([0., 1., 0.])
    """
    _per_sample(factor, check_images("x", x, in_unit_range=True), "factor", -0.5, 0.5)
    return _ops.adjust_hue(x, factor)


def color_jitter(
    x: torch.Tensor,
    brightness: torch.Tensor,
    contrast: torch.Tensor,
    saturation: torch.Tensor,
    hue: torch.Tensor,
    order: torch.Tensor,
    apply: torch.Tensor | None = None,
) -> torch.Tensor:
    """torchvision's ``ColorJitter`` with per-sample factors and a per-sample op order.

    Args:
        x: ``(B, 3, H, W)`` float images in ``[0, 1]``.
        brightness: ``(B,)`` brightness factors (1 = unchanged).
        contrast: ``(B,)`` contrast factors (1 = unchanged).
        saturation: ``(B,)`` saturation factors (1 = unchanged).
        hue: ``(B,)`` hue shifts in turns (0 = unchanged).
        order: ``(B, 4)`` permutation of ``0..3`` (brightness, contrast, saturation,
            hue) per sample: the order the four are applied in, each clamped to [0, 1].
        apply: optional ``(B,)`` bool; samples where it is False are returned unchanged.

    Brightness, contrast and saturation are all ``clamp(f * x + (1 - f) * ref)`` with
    ``ref`` = 0, the mean luma, or the luma image; so the batch runs three generic
    blend slots before the hue rotation and three after it, each sample using the
    slots its order puts on that side (identity, ``f = 1``, elsewhere), and one hue
    rotation: seven passes whatever the orders, with no Python loop over the batch.

    Examples:
        >>> import torch
        >>> from momentum_contrast.augment.functional import color_jitter
        >>> x, n = torch.rand(4, 3, 8, 8), 4
        >>> order = torch.stack([torch.randperm(4) for _ in range(n)])
        >>> ones = torch.ones(n)
        >>> y = color_jitter(x, 1.2 * ones, ones, ones, 0 * ones, order)  # brightness only
        >>> torch.allclose(y, (1.2 * x).clamp(0, 1), atol=1e-6)
        True
    """
    check_images("x", x, in_unit_range=True)
    factors = {"brightness": brightness, "contrast": contrast, "saturation": saturation}
    for name, factor in {**factors, "hue": hue}.items():
        _per_sample(factor, x, name, *((-0.5, 0.5) if name == "hue" else ()))
    order = check_order(order, x)
    if apply is not None:
        check_mask("apply", apply, x)
    return _ops.color_jitter(x, brightness, contrast, saturation, hue, order, apply)


def solarize(x: torch.Tensor, apply: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Invert pixels ``>= threshold`` in the samples where ``apply`` (``(B,)`` bool) is set.

    Examples:
        >>> import torch
        >>> from momentum_contrast.augment.functional import solarize
        >>> x = torch.tensor([0.2, 0.7]).view(2, 1, 1, 1)
        >>> solarize(x, torch.tensor([True, True])).flatten()
        tensor([0.2000, 0.3000])
    """
    x = check_images("x", x, in_unit_range=True)
    if isinstance(threshold, torch.Tensor) and threshold.dim() == 0:
        check_values("threshold", threshold, 0.0, 1.0)
    else:
        threshold = check_unit_interval("threshold", threshold)
    return _ops.solarize(x, check_mask("apply", apply, x), threshold)


def hflip(x: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """Mirror left-right the samples where ``apply`` (``(B,)`` bool) is set.

    Examples:
        >>> import torch
        >>> from momentum_contrast.augment.functional import hflip
        >>> x = torch.arange(4.0).view(1, 1, 1, 4)
        >>> hflip(x, torch.tensor([True])).flatten()
        tensor([3., 2., 1., 0.])
    """
    x = check_images("x", x, any_channels=True)
    return torch.where(check_mask("apply", apply, x).view(-1, 1, 1, 1), x.flip(-1), x)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int = 23) -> torch.Tensor:
    """Separable Gaussian blur with per-sample ``sigma`` (``(B,)``) and reflect padding.

    The kernel is ``exp(-t^2 / (2 sigma^2))`` at the integer offsets
    ``t = -(k-1)/2 ... (k-1)/2``, normalised, as torchvision. A sample with a tiny
    sigma (``< 1e-3``) gets the identity kernel, so "no blur" costs the same and
    changes nothing. The two 1-D passes run as batched matrix products with per-sample
    reflect-padded Toeplitz matrices (on a GPU measured faster than a grouped convolution).

    Examples:
        >>> import torch
        >>> from momentum_contrast.augment.functional import gaussian_blur
        >>> x = torch.rand(2, 3, 32, 32)
        >>> torch.equal(gaussian_blur(x, torch.zeros(2)), x)  # sigma 0: unchanged
        True
    """
    check_positive_int("kernel_size", kernel_size)
    _per_sample(sigma, check_images("x", x, any_channels=True), "sigma")
    return _ops.gaussian_blur(x, sigma, kernel_size)


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``(x - mean) / std`` per channel; ``mean`` and ``std``: ``(C,)``.

    Examples:
        >>> import torch
        >>> from momentum_contrast.augment.functional import normalize
        >>> x = torch.full((1, 3, 1, 1), 0.5)
        >>> normalize(x, torch.full((3,), 0.5), torch.full((3,), 0.25)).flatten()
        tensor([0., 0., 0.])
    """
    x = check_images("x", x, any_channels=True)
    check_values("mean", check_vector("mean", mean, x, dim=1), -math.inf)
    check_values("std", check_vector("std", std, x, dim=1), -math.inf, nonzero=True)
    return _ops.normalize(x, mean, std)


def resized_crop(
    images: torch.Tensor | list[torch.Tensor],
    boxes: torch.Tensor,
    size: int,
    *,
    flip: torch.Tensor | None = None,
    antialias: bool = True,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Crop ``(top, left, height, width)`` from each image and resize it to ``size x size``.

    Args:
        images: ``(B, C, H, W)`` batch, or a list of ``(C, H_i, W_i)`` images, ``C`` in
            {1, 3} (uint8 values in ``[0, 255]`` or floats in ``[0, 1]``; floats outside
            it are a ``ValueError`` on the CPU and clamped, unread, on a GPU).
        boxes: ``(B, 4)`` integer ``(top, left, height, width)`` on the images' device,
            each inside its image: ``top, left >= 0``, ``height, width >= 1``,
            ``top + height <= H_i``, ``left + width <= W_i``. Checked (``ValueError``)
            for boxes on the CPU; on a GPU, reading them would wait for the device, so a
            box outside its image turns that sample's output into NaN instead.
        size: output side ``S``.
        flip: optional ``(B,)`` bool; those outputs are mirrored left-right (free).
        antialias: antialiased bilinear filter when shrinking (as PIL / torchvision).
        dtype: dtype of the two resampling matrix products. ``torch.float16`` uses the
            GPU's tensor cores (uint8 pixels are exact in it; results differ from float32
            by at most about 1e-3).

    Returns:
        ``(B, C, S, S)`` float32 in ``[0, 1]``.

    Examples:
        >>> import torch
        >>> from momentum_contrast.augment.functional import resized_crop
        >>> images = torch.randint(0, 256, (2, 3, 60, 80), dtype=torch.uint8)
        >>> boxes = torch.tensor([[0, 0, 60, 80], [10, 20, 30, 30]])  # (top, left, h, w)
        >>> resized_crop(images, boxes, 32).shape
        torch.Size([2, 3, 32, 32])
    """
    # variable-size images are padded into one batch; the weights ignore the padding
    batch, heights, widths = as_batch(images)
    inside = check_boxes(boxes, batch, heights, widths)  # raises here for CPU boxes
    size = check_positive_int("size", size)
    check_float_dtype("dtype", dtype)  # an integer one would cut the weights to 0
    check_bool("antialias", antialias)
    if flip is not None:
        check_mask("flip", flip, batch, "images")
    wy, wx = _ops.resized_crop_weights(
        boxes, batch.shape[2], batch.shape[3], size, flip, antialias, dtype
    )
    wy = torch.where(inside[:, None, None], wy, torch.nan)  # a box outside its image: NaN
    out = _ops.apply_resample(batch, wy, wx).float()
    if not batch.is_floating_point():
        out = out.mul_(1.0 / 255.0)
    return out.clamp_(0.0, 1.0)
