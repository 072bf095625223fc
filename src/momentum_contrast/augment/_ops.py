"""The batched image kernels, unchecked, and a recipe view's work after its crop (private).

[`momentum_contrast.augment.functional`][] checks its arguments and calls these; the
recipes call them directly on tensors they made themselves, so a view pays for no check
(and a compiled stage holds no branch on tensor values). Shapes and ranges are as in
``functional``: float ``(B, C, H, W)`` images in ``[0, 1]``, ``(B,)`` per-sample values.
``after_crop_stage`` is one function so that ``torch.compile`` can fuse it when a recipe
is built with ``compile=True``.

Crop-and-resize of a batch with per-sample boxes, as two batched matrix products.

Resizing is separable: out = Wy @ crop @ Wx.T, where each row of Wy (Wx) holds the
interpolation weights of one output row (column) over the input rows (columns).
The weights are those of antialiased bilinear resizing (a triangle filter widened
by the downscale factor, normalised over the taps inside the crop), which is what
PIL and ``torchvision``'s ``antialias=True`` compute; without antialiasing, the
filter keeps width 1 (plain bilinear). Crop boxes and horizontal flips are folded
into the weights, so neither costs a pass over the image.
"""

from __future__ import annotations

import torch
from einops import rearrange

_GRAY = (0.2989, 0.587, 0.114)  # ITU-R 601 luma weights, as torchvision


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` -> ``(B, 1, H, W)`` luma; one channel is returned as it is."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(dim=1)
    return r.mul(_GRAY[0]).add_(g, alpha=_GRAY[1]).add_(b, alpha=_GRAY[2]).unsqueeze(1)


def adjust_hue(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Hue rotated by ``factor`` (``(B,)``) turns, via HSV; in float32 at least (in
    bfloat16, ``6 h`` near 6 keeps 2 bits of its fraction: errors of 0.05)."""
    if x.shape[1] == 1:
        return x
    if x.element_size() < 4:
        return adjust_hue(x.float(), factor).to(x.dtype)
    f = factor.to(x.dtype).view(-1, 1, 1)
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
    """ColorJitter with per-sample factors and order: six blend slots and one hue pass."""
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
    """Pixels ``>= threshold`` inverted in the samples where ``apply`` is set."""
    mask = apply.view(-1, 1, 1, 1) & (x >= threshold)
    return torch.where(mask, 1.0 - x, x)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int = 23) -> torch.Tensor:
    """Separable Gaussian blur, per-sample ``sigma``, reflect padding (see ``functional``):
    ``(B, k)`` normalised taps at ``-(k-1)/2 ... (k-1)/2``, computed in float32 (after
    ``sigma`` is cast to ``x``'s dtype), applied as two batched matrix products."""
    if kernel_size % 2 == 0:  # < 1: refused by functional and by the recipes
        raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size}")
    half = kernel_size // 2
    if half >= min(x.shape[2], x.shape[3]):
        raise ValueError(f"kernel_size {kernel_size} needs images larger than {half} px")
    t = torch.arange(-half, half + 1, device=x.device, dtype=torch.float32)
    sig = sigma.to(x.dtype).view(-1, 1).float().clamp(min=1e-3)
    kernel = torch.exp(-0.5 * (t / sig) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).to(x.dtype)  # (B, k)
    wy, wx = reflect_blur_matrix(kernel, x.shape[2]), reflect_blur_matrix(kernel, x.shape[3])
    return apply_resample(x, wy, wx)


def reflect_blur_matrix(kernel: torch.Tensor, n: int) -> torch.Tensor:
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


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``(x - mean) / std`` per channel, as one fused multiply-add."""
    scale = (1.0 / std).to(x.dtype).view(1, -1, 1, 1)
    return torch.addcmul((-mean * (1.0 / std)).to(x.dtype).view(1, -1, 1, 1), x, scale)


JITTER = ("brightness", "contrast", "saturation", "hue", "order", "apply")


def after_crop_stage(
    x: torch.Tensor,
    draws: dict[str, torch.Tensor],
    scale: float,
    mean: torch.Tensor,
    std: torch.Tensor,
    grayscale_first: bool,
    kernel_size: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Everything after the crop: to [0, 1], grayscale and jitter in the recipe's order,
    blur, solarize, normalise. ``draws`` holds the view's per-sample parameters: the
    ``grayscale`` mask, the arguments of ``color_jitter`` named as there, and ``sigma``
    and ``solarize`` only where the view blurs or solarizes at all."""
    b, _, s, _ = x.shape
    x = (x.to(dtype) * scale).clamp_(0.0, 1.0).expand(b, 3, s, s)  # gray input repeated
    gray = draws["grayscale"].view(-1, 1, 1, 1)
    if grayscale_first:
        x = torch.where(gray, grayscale(x).expand_as(x), x)
    x = color_jitter(x, **{name: draws[name] for name in JITTER})
    if not grayscale_first:
        x = torch.where(gray, grayscale(x).expand_as(x), x)
    if "sigma" in draws:
        x = gaussian_blur(x, draws["sigma"], kernel_size)
    if "solarize" in draws:
        x = solarize(x, draws["solarize"])
    return normalize(x, mean, std)


def resample_weights(
    start: torch.Tensor,
    length: torch.Tensor,
    in_size: int,
    out_size: int,
    antialias: bool,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Interpolation matrices resizing ``[start, start + length)`` to ``out_size`` samples.

    Args:
        start: ``(B,)`` first input index of each crop.
        length: ``(B,)`` number of input samples in each crop (``>= 1``).
        in_size: input extent (the padded size for variable-size batches).
        out_size: output extent.

    Returns:
        ``(B, out_size, in_size)`` weights; each row sums to 1 and is zero outside the crop.
    """
    start = start.to(torch.float32)[:, None, None]  # (B, 1, 1)
    length = length.to(torch.float32)[:, None, None]
    scale = length / out_size  # input samples per output sample
    support = torch.clamp(scale, min=1.0) if antialias else torch.ones_like(scale)
    o = torch.arange(out_size, dtype=torch.float32, device=start.device)[None, :, None]
    k = torch.arange(in_size, dtype=torch.float32, device=start.device)[None, None, :]
    center = (o + 0.5) * scale  # in crop coordinates
    tap = k - start  # (1 or B, 1, in) crop coordinate of every input sample
    w = torch.clamp(1.0 - torch.abs((tap + 0.5 - center) / support), min=0.0)
    w = w * ((tap >= 0) & (tap < length))  # only taps inside the crop
    w = w / w.sum(dim=2, keepdim=True)
    return w.to(dtype)


def resized_crop_weights(
    boxes: torch.Tensor,
    in_height: int,
    in_width: int,
    size: int,
    flip: torch.Tensor | None,
    antialias: bool,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Wy (B, S, H), Wx (B, S, W))`` for boxes ``(B, 4)`` = (top, left, height, width)."""
    wy = resample_weights(boxes[:, 0], boxes[:, 2], in_height, size, antialias, dtype)
    wx = resample_weights(boxes[:, 1], boxes[:, 3], in_width, size, antialias, dtype)
    if flip is not None:  # mirrored output columns = mirrored rows of Wx
        wx = torch.where(flip[:, None, None], wx.flip(1), wx)
    return wy, wx


def apply_resample(images: torch.Tensor, wy: torch.Tensor, wx: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` images -> ``(B, C, S, S)`` with ``Wy @ image @ Wx.T`` per sample."""
    x = rearrange(images.to(wx.dtype), "b c h w -> b (c h) w") @ wx.transpose(1, 2)
    return wy[:, None] @ rearrange(x, "b (c h) s -> b c h s", c=images.shape[1])  # (B, C, S, S)
