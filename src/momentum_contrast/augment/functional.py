"""Batched image operations with per-sample parameters, in pure torch.

Images are float ``(B, C, H, W)`` tensors in ``[0, 1]`` (``C`` = 3, or 1 where noted);
per-sample parameters are ``(B,)`` tensors on the same device. Each op computes
the same result as ``torchvision.transforms.v2.functional`` applied to every
sample with its own parameter, without a Python loop over the batch.

Examples:
    >>> import torch
    >>> from momentum_contrast.augment import functional as AF
    >>> x = torch.rand(4, 3, 32, 32)
    >>> y = AF.adjust_brightness(x, torch.tensor([0.5, 1.0, 1.2, 1.4]))
    >>> y.shape, bool(y.max() <= 1)
    (torch.Size([4, 3, 32, 32]), True)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from momentum_contrast.augment._resample import apply_resample, pad_to_batch, resized_crop_weights

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

_GRAY = (0.2989, 0.587, 0.114)  # ITU-R 601 luma weights, as torchvision


def _per_sample(factor: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if factor.shape != (x.shape[0],):
        raise ValueError(
            f"per-sample parameters must have shape ({x.shape[0]},), got {tuple(factor.shape)}"
        )
    return factor.to(x.dtype).view(-1, 1, 1, 1)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma ``0.2989 R + 0.587 G + 0.114 B``: ``(B, 3, H, W)`` -> ``(B, 1, H, W)``.

    Examples:
        >>> import torch
        >>> from momentum_contrast.augment.functional import grayscale
        >>> grayscale(torch.ones(2, 3, 4, 4)).shape
        torch.Size([2, 1, 4, 4])
    """
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(dim=1)
    return r.mul(_GRAY[0]).add_(g, alpha=_GRAY[1]).add_(b, alpha=_GRAY[2]).unsqueeze(1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``clamp(x * factor, 0, 1)`` per sample; ``factor``: ``(B,)``.

    Examples:
        >>> import torch
        >>> from momentum_contrast.augment.functional import adjust_brightness
        >>> adjust_brightness(torch.full((2, 3, 4, 4), 0.5), torch.tensor([0.5, 3.0]))[:, 0, 0, 0]
        tensor([0.2500, 1.0000])
    """
    return (x * _per_sample(factor, x)).clamp_(0.0, 1.0)


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
    f = _per_sample(factor, x)
    mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
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
    if x.shape[1] == 1:
        return x
    f = _per_sample(factor, x)
    return (f * x + (1 - f) * grayscale(x)).clamp_(0.0, 1.0)


def adjust_hue(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by ``factor`` turns (``(B,)`` in ``[-0.5, 0.5]``), via HSV.

    Examples:
        >>> import torch
        >>> from momentum_contrast.augment.functional import adjust_hue
        >>> red = torch.zeros(1, 3, 2, 2); red[:, 0] = 1.0
        >>> adjust_hue(red, torch.tensor([1 / 3]))[0, :, 0, 0]  # a third of a turn: green
        tensor([0., 1., 0.])
    """
    if x.shape[1] == 1:
        return x
    f = _per_sample(factor, x)[:, 0]  # (B, 1, 1)
    v, top = x.max(dim=1, keepdim=True)  # value, and which channel is largest (r first)
    chroma = v - x.min(dim=1, keepdim=True).values  # (B, 1, H, W)
    flat = chroma == 0
    s = chroma / torch.where(flat, 1.0, v)  # 0 where flat
    # hue sector: max r -> (g - b)/c, max g -> (b - r)/c + 2, max b -> (r - g)/c + 4
    first, second = x.gather(1, (top + 1) % 3), x.gather(1, (top + 2) % 3)
    h = (first - second) / torch.where(flat, 1.0, chroma) + 2.0 * top.to(x.dtype)
    h = torch.remainder(h[:, 0] / 6.0 + f, 1.0)  # shifted hue in [0, 1); flat: h = f
    # back to RGB: each channel n in (5, 3, 1) is v - v*s*clamp(min(k, 4 - k), 0, 1)
    # with k = (n + 6h) mod 6 (the standard piecewise-linear hue ramps)
    n = (5 - 2 * torch.arange(3, device=x.device, dtype=x.dtype)).view(1, 3, 1, 1)  # 5, 3, 1
    k = torch.remainder(n + 6.0 * h.unsqueeze(1), 6.0)
    ramp = torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)
    return (v * (1.0 - s * ramp)).clamp_(0.0, 1.0)


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
    factors = torch.stack([brightness, contrast, saturation], dim=1).to(x.dtype)  # (B, 3)
    hue_at = (order == 3).long().argmax(dim=1, keepdim=True)  # (B, 1) position of hue
    slot_t = torch.arange(6, device=x.device)
    slot_t = slot_t - 2 * (slot_t >= 3)  # 0 1 2 | 1 2 3: three slots before hue, three after
    ops = order[:, slot_t].clamp(max=2)  # (B, 6) op of each slot (hue -> inactive below)
    active = torch.cat([slot_t[:3] < hue_at, slot_t[3:] > hue_at], dim=1)  # (B, 6)
    f = torch.where(active, factors.gather(1, ops), 1.0)  # 1 = identity (lerp exact)
    use_gray, use_mean = (ops == 2), (ops == 1)
    out = x
    for slot in range(6):
        if slot == 3:
            out = adjust_hue(out, hue)
        gray = grayscale(out)  # (B, 1, H, W)
        mean = gray.mean(dim=(1, 2, 3), keepdim=True) * use_mean[:, slot].view(-1, 1, 1, 1)
        ref = torch.where(use_gray[:, slot].view(-1, 1, 1, 1), gray, mean)  # 0 for brightness
        out = torch.lerp(ref, out, f[:, slot].view(-1, 1, 1, 1)).clamp_(0.0, 1.0)
    if apply is None:
        return out
    return torch.where(apply.view(-1, 1, 1, 1), out, x)


def solarize(x: torch.Tensor, apply: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Invert pixels ``>= threshold`` in the samples where ``apply`` (``(B,)`` bool) is set.

    Examples:
        >>> import torch
        >>> from momentum_contrast.augment.functional import solarize
        >>> x = torch.tensor([0.2, 0.7]).view(2, 1, 1, 1)
        >>> solarize(x, torch.tensor([True, True])).flatten()
        tensor([0.2000, 0.3000])
    """
    mask = apply.view(-1, 1, 1, 1) & (x >= threshold)
    return torch.where(mask, 1.0 - x, x)


def hflip(x: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """Mirror left-right the samples where ``apply`` (``(B,)`` bool) is set.

    Examples:
        >>> import torch
        >>> from momentum_contrast.augment.functional import hflip
        >>> x = torch.arange(4.0).view(1, 1, 1, 4)
        >>> hflip(x, torch.tensor([True])).flatten()
        tensor([3., 2., 1., 0.])
    """
    return torch.where(apply.view(-1, 1, 1, 1), x.flip(-1), x)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int = 23) -> torch.Tensor:
    """Separable Gaussian blur with per-sample ``sigma`` (``(B,)``) and reflect padding.

    The kernel is ``exp(-t^2 / (2 sigma^2))`` at the integer offsets
    ``t = -(k-1)/2 ... (k-1)/2``, normalised, as torchvision. A sample with a tiny
    sigma (``< 1e-3``) gets the identity kernel, so "no blur" costs the same and
    changes nothing. On CUDA the two 1-D passes run as batched matrix products with
    per-sample reflect-padded Toeplitz matrices (measured faster there than a grouped
    convolution); elsewhere as a grouped convolution. Both give the same result.

    Examples:
        >>> import torch
        >>> from momentum_contrast.augment.functional import gaussian_blur
        >>> x = torch.rand(2, 3, 32, 32)
        >>> torch.equal(gaussian_blur(x, torch.zeros(2)), x)  # sigma 0: unchanged
        True
    """
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size}")
    b, c, h, w = x.shape
    half = kernel_size // 2
    if half >= min(h, w):
        raise ValueError(f"kernel_size {kernel_size} needs images larger than {half} px")
    if x.device.type == "cuda":
        return _gaussian_blur_matmul(x, sigma, kernel_size)
    t = torch.arange(-half, half + 1, device=x.device, dtype=x.dtype)  # (k,)
    sig = _per_sample(sigma, x).view(b, 1).clamp(min=1e-3)
    kernel = torch.exp(-0.5 * (t / sig) ** 2)  # (B, k)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    kernel = kernel.repeat_interleave(c, dim=0)  # (B*C, k): one filter per channel
    y = F.pad(x.reshape(1, b * c, h, w), (half, half, half, half), mode="reflect")
    y = F.conv2d(y, kernel.view(b * c, 1, kernel_size, 1), groups=b * c)  # vertical
    y = F.conv2d(y, kernel.view(b * c, 1, 1, kernel_size), groups=b * c)  # horizontal
    return y.view(b, c, h, w)


def _reflect_blur_matrix(kernel: torch.Tensor, n: int) -> torch.Tensor:
    """``(B, n, n)`` matrices applying 1-D kernels ``(B, k)`` with reflect padding."""
    b, k = kernel.shape
    half = k // 2
    idx = torch.arange(n, device=kernel.device)[:, None] + torch.arange(
        -half, half + 1, device=kernel.device
    )
    idx = idx.abs()  # reflect at 0 (index -1 -> 1)
    idx = torch.where(idx > n - 1, 2 * (n - 1) - idx, idx)  # reflect at n - 1
    m = kernel.new_zeros((b, n, n))
    return m.scatter_add_(2, idx.expand(b, n, k), kernel[:, None, :].expand(b, n, k))


def _gaussian_blur_matmul(
    x: torch.Tensor, sigma: torch.Tensor, kernel_size: int = 23
) -> torch.Tensor:
    """[`gaussian_blur`][] as two batched matrix products (same result)."""
    b, c, h, w = x.shape
    half = kernel_size // 2
    t = torch.arange(-half, half + 1, device=x.device, dtype=torch.float32)
    sig = _per_sample(sigma, x).view(b, 1).float().clamp(min=1e-3)
    kernel = torch.exp(-0.5 * (t / sig) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).to(x.dtype)  # (B, k)
    gy, gx = _reflect_blur_matrix(kernel, h), _reflect_blur_matrix(kernel, w)
    y = (x.reshape(b, c * h, w) @ gx.transpose(1, 2)).view(b, c, h, w)  # horizontal
    return gy[:, None] @ y  # vertical


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``(x - mean) / std`` per channel; ``mean`` and ``std``: ``(C,)``.

    Examples:
        >>> import torch
        >>> from momentum_contrast.augment.functional import normalize
        >>> x = torch.full((1, 3, 1, 1), 0.5)
        >>> normalize(x, torch.full((3,), 0.5), torch.full((3,), 0.25)).flatten()
        tensor([0., 0., 0.])
    """
    scale = (1.0 / std).to(x.dtype).view(1, -1, 1, 1)
    return torch.addcmul((-mean * (1.0 / std)).to(x.dtype).view(1, -1, 1, 1), x, scale)


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
        images: ``(B, C, H, W)`` batch, or a list of ``(C, H_i, W_i)`` images (uint8
            values in ``[0, 255]`` or floats in ``[0, 1]``).
        boxes: ``(B, 4)`` integer boxes inside each image.
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
    n = images.shape[0] if isinstance(images, torch.Tensor) else len(images)
    if not isinstance(boxes, torch.Tensor) or boxes.shape != (n, 4) or boxes.is_floating_point():
        shape = tuple(boxes.shape) if isinstance(boxes, torch.Tensor) else type(boxes).__name__
        raise ValueError(f"boxes must be an integer tensor of shape ({n}, 4), got {shape}")
    # variable-size images are padded into one batch; the weights ignore the padding
    batch = images if isinstance(images, torch.Tensor) else pad_to_batch(images)
    wy, wx = resized_crop_weights(
        boxes, batch.shape[2], batch.shape[3], size, flip, antialias, dtype
    )
    out = apply_resample(batch, wy, wx).float()
    if not batch.is_floating_point():
        out = out.mul_(1.0 / 255.0)
    return out.clamp_(0.0, 1.0)
