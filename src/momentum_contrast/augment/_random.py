"""Per-sample random parameters for the augmentation recipes (private).

Everything is drawn as tensors, in one call per parameter for the whole batch, so
no value is read back to the host. Draws happen on the generator's device (the
batch's device when no generator is given) and are moved to the batch's device: to a GPU
with a non-blocking copy, into host memory with one the host waits for.
"""

from __future__ import annotations

import math

import torch


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``: from host memory to CUDA through pinned memory, with a copy the
    host does not wait for (a tensor already there is returned as is). Into host memory
    the copy is waited for: the host reads the result next, which a non-blocking copy from
    a GPU would not have written yet (a CUDA generator for CPU images)."""
    if t.device.type == "cpu" and device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=device.type != "cpu")


class Sampler:
    """Draws batch-sized random tensors on ``device`` from ``generator`` (or the global RNG)."""

    def __init__(self, device: torch.device, generator: torch.Generator | None) -> None:
        self.device = device
        self.generator = generator
        self.draw_device = device if generator is None else generator.device

    def _rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=self.generator, device=self.draw_device)

    def uniform(self, shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
        return to_device(self._rand(*shape) * (high - low) + low, self.device)

    def bernoulli(self, n: int, p: float) -> torch.Tensor:
        """(n,) bool: True with probability ``p``."""
        return to_device(self._rand(n) < p, self.device)

    def permutations(self, n: int, k: int) -> torch.Tensor:
        """(n, k) long: an independent uniform random permutation of ``range(k)`` per row."""
        return to_device(self._rand(n, k).argsort(dim=1), self.device)


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
    h_img, w_img = heights.double(), widths.double()  # (B,)
    target = (h_img * w_img)[:, None] * sampler.uniform((b, tries), *scale).double()
    log_r = sampler.uniform((b, tries), math.log(ratio[0]), math.log(ratio[1])).double()
    aspect = torch.exp(log_r)
    w = torch.round(torch.sqrt(target * aspect))  # (B, tries)
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= w_img[:, None]) & (h > 0) & (h <= h_img[:, None])
    first = fits.double().argmax(dim=1, keepdim=True)  # first fitting try (0 if none)
    h_pick, w_pick = h.gather(1, first)[:, 0], w.gather(1, first)[:, 0]
    u_top = sampler.uniform((b,), 0.0, 1.0).double()
    u_left = sampler.uniform((b,), 0.0, 1.0).double()
    top = torch.floor(u_top * (h_img - h_pick + 1)).clamp(max=h_img - h_pick)
    left = torch.floor(u_left * (w_img - w_pick + 1)).clamp(max=w_img - w_pick)
    # fallback: centre crop, clamped to the ratio range
    fb_w = torch.where(w_img / h_img > ratio[1], torch.round(h_img * ratio[1]), w_img)
    fb_h = torch.where(w_img / h_img < ratio[0], torch.round(w_img / ratio[0]), h_img)
    fb_top = torch.div(h_img - fb_h, 2, rounding_mode="floor")
    fb_left = torch.div(w_img - fb_w, 2, rounding_mode="floor")
    picked = torch.stack([top, left, h_pick, w_pick], dim=1)
    fallback = torch.stack([fb_top, fb_left, fb_h, fb_w], dim=1)
    return torch.where(fits.any(dim=1, keepdim=True), picked, fallback).long()
