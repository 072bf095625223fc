"""Per-sample random parameters for the augmentation recipes (private).

Everything is drawn as tensors, in one call per parameter for the whole batch, so
no value is read back to the host. Draws happen on the generator's device (the
batch's device when no generator is given) and are moved with a non-blocking copy.
"""

from __future__ import annotations

import math

import torch


class Sampler:
    """Draws batch-sized random tensors on ``device`` from ``generator`` (or the global RNG)."""

    def __init__(self, device: torch.device, generator: torch.Generator | None) -> None:
        self.device = device
        self.generator = generator
        self.draw_device = device if generator is None else generator.device

    def _out(self, t: torch.Tensor) -> torch.Tensor:
        if t.device == self.device:
            return t
        if t.device.type == "cpu" and self.device.type == "cuda":
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)

    def uniform(self, shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
        u = torch.rand(shape, generator=self.generator, device=self.draw_device)
        return self._out(u * (high - low) + low)

    def bernoulli(self, n: int, p: float) -> torch.Tensor:
        """(n,) bool: True with probability ``p``."""
        u = torch.rand(n, generator=self.generator, device=self.draw_device)
        return self._out(u < p)

    def permutations(self, n: int, k: int) -> torch.Tensor:
        """(n, k) long: an independent uniform random permutation of ``range(k)`` per row."""
        keys = torch.rand(n, k, generator=self.generator, device=self.draw_device)
        return self._out(keys.argsort(dim=1))


def crop_boxes(
    sampler: Sampler,
    heights: torch.Tensor,
    widths: torch.Tensor,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    tries: int = 10,
) -> torch.Tensor:
    """torchvision's RandomResizedCrop rule, for a whole batch at once.

    Per sample: up to ``tries`` candidates with area fraction ``U(scale)`` and
    aspect ratio ``exp(U(log ratio))``; the first one that fits (after rounding
    width and height to integers) is placed uniformly at random; if none fits, a
    centre crop clamped to the ratio range is used.

    Args:
        heights: ``(B,)`` image heights (any numeric dtype), on the sampler's device.
        widths: ``(B,)`` image widths.

    Returns:
        ``(B, 4)`` long tensor of ``(top, left, height, width)``.
    """
    b = heights.shape[0]
    h_img, w_img = heights.double()[:, None], widths.double()[:, None]  # (B, 1)
    area = h_img * w_img
    target = area * sampler.uniform((b, tries), scale[0], scale[1]).double()
    log_r = sampler.uniform((b, tries), math.log(ratio[0]), math.log(ratio[1])).double()
    aspect = torch.exp(log_r)
    w = torch.round(torch.sqrt(target * aspect))  # (B, tries)
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= w_img) & (h > 0) & (h <= h_img)
    first = fits.double().argmax(dim=1, keepdim=True)  # first fitting try (0 if none)
    any_fit = fits.any(dim=1)
    w_pick, h_pick = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
    u_top, u_left = (
        sampler.uniform((b,), 0.0, 1.0).double(),
        sampler.uniform((b,), 0.0, 1.0).double(),
    )
    top = torch.floor(u_top * (h_img[:, 0] - h_pick + 1)).clamp(max=h_img[:, 0] - h_pick)
    left = torch.floor(u_left * (w_img[:, 0] - w_pick + 1)).clamp(max=w_img[:, 0] - w_pick)
    # fallback: centre crop, clamped to the ratio range
    in_ratio = w_img[:, 0] / h_img[:, 0]
    fb_w = torch.where(in_ratio > ratio[1], torch.round(h_img[:, 0] * ratio[1]), w_img[:, 0])
    fb_h = torch.where(in_ratio < ratio[0], torch.round(w_img[:, 0] / ratio[0]), h_img[:, 0])
    fb_top = torch.div(h_img[:, 0] - fb_h, 2, rounding_mode="floor")
    fb_left = torch.div(w_img[:, 0] - fb_w, 2, rounding_mode="floor")
    box = torch.stack(
        [
            torch.where(any_fit, top, fb_top),
            torch.where(any_fit, left, fb_left),
            torch.where(any_fit, h_pick, fb_h),
            torch.where(any_fit, w_pick, fb_w),
        ],
        dim=1,
    )
    return box.long()
