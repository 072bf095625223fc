"""Crop-and-resize of a batch with per-sample boxes, as two batched matrix products.

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
