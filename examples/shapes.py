"""`shapes`: a built-in labelled image dataset, drawn procedurally (no download).

Ten classes of shapes (circle, square, triangle, pentagon, hexagon, star, ring, cross,
ellipse, half-disc), each with a random size, position, tilt and brightness, on a
plain background: only the shape identifies the class.
Deterministic from the seed; drawn batched in torch.
"""

from __future__ import annotations

import math

import torch

CLASSES = (
    "circle", "square", "triangle", "pentagon", "hexagon",
    "star", "ring", "cross", "ellipse", "half-disc",
)  # fmt: skip


def _polygon(rho: torch.Tensor, phi: torch.Tensor, r: torch.Tensor, n: int) -> torch.Tensor:
    sector = 2 * math.pi / n
    return rho * torch.cos(torch.remainder(phi, sector) - sector / 2) < r * math.cos(math.pi / n)


def make_shapes(n: int, size: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images ``(n, 3, size, size)`` uint8 and their labels ``(n,)`` in ``0..9``."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % len(CLASSES)
    labels = labels[torch.randperm(n, generator=g)]

    def u(*shape: int, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(*shape, generator=g)

    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    r = u(n, 1, 1, lo=0.35, hi=0.65)
    cx, cy = u(n, 1, 1, lo=-0.25, hi=0.25), u(n, 1, 1, lo=-0.25, hi=0.25)
    theta = u(n, 1, 1, lo=-0.3, hi=0.3)  # a slight tilt only: orientation is no identity
    dx, dy = xx - cx, yy - cy
    uu = dx * torch.cos(theta) + dy * torch.sin(theta)  # rotated coordinates
    vv = -dx * torch.sin(theta) + dy * torch.cos(theta)
    rho, phi = torch.sqrt(uu**2 + vv**2), torch.atan2(vv, uu)
    masks = torch.stack(
        [
            rho < r,
            torch.maximum(uu.abs(), vv.abs()) < 0.8 * r,
            _polygon(rho, phi, r, 3),
            _polygon(rho, phi, r, 5),
            _polygon(rho, phi, r, 6),
            rho < r * (0.6 + 0.4 * torch.cos(5 * phi)),
            (rho < r) & (rho > 0.6 * r),
            ((uu.abs() < 0.3 * r) & (vv.abs() < r)) | ((vv.abs() < 0.3 * r) & (uu.abs() < r)),
            (uu / r) ** 2 + (vv / (0.5 * r)) ** 2 < 1,
            (rho < r) & (vv > 0),
        ]
    )  # (10, n, size, size)
    mask = masks[labels, torch.arange(n)].float()[:, None]  # (n, 1, size, size)
    # a light shape on a dark background, the same for every image: nothing but the shape
    # (its class, size, position and a slight tilt) tells images apart, so contrastive
    # learning has to learn shapes rather than colours or textures unique to an image.
    bg = torch.full((n, 3, 1, 1), 0.15)
    fg = torch.full((n, 3, 1, 1), 0.9)
    img = mask * fg + (1 - mask) * bg + 0.02 * torch.randn(n, 3, size, size, generator=g)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8), labels
