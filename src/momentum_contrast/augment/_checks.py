"""Argument checks of the augmentation (private).

Dtypes, shapes and devices are host metadata and are always checked. Pixel *values*
(float images in ``[0, 1]``) and crop boxes are read only where that is free: tensors in
host memory (the CPU), outside ``torch.compile``. Reading a GPU tensor's values would make
the host wait for the device, which the library never does in a training step.
"""

from __future__ import annotations

import math

import torch

from momentum_contrast._checks import check_same_device, is_integer, is_real
from momentum_contrast.augment._random import to_device


def _free_to_read(x: torch.Tensor) -> bool:
    """True where reading values costs no host-device synchronisation and no graph break."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling() and x.numel() > 0


def check_image_dtype(name: str, x: object, *, uint8: bool) -> torch.Tensor:
    """A tensor of a floating dtype (or ``uint8`` where allowed): no other integer,
    bool or complex dtype."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not (x.is_floating_point() or (uint8 and x.dtype == torch.uint8)):
        kinds = "uint8 (0 to 255) or floating-point (0 to 1)" if uint8 else "floating-point"
        raise TypeError(f"{name} must have a {kinds} dtype, got {x.dtype}")
    return x


def check_range(name: str, x: torch.Tensor) -> None:
    """Float pixels in ``[0, 1]``, checked only where reading them is free (see above)."""
    if x.is_floating_point() and _free_to_read(x):
        low, high = (float(v) for v in torch.aminmax(x))
        if not (low >= 0.0 and high <= 1.0):  # also refuses NaN
            raise ValueError(
                f"{name} must hold float pixel values in [0, 1], got values in [{low}, {high}]"
                " (divide 0-255 images by 255, or pass them as uint8)"
            )


def check_values(
    name: str, t: torch.Tensor, low: float, high: float = math.inf, *, nonzero: bool = False
) -> torch.Tensor:
    """Finite values in ``[low, high]`` (and none 0 with ``nonzero``), checked only where
    reading them is free (see above), as torchvision checks its parameters."""
    if _free_to_read(t):
        lo, hi = (float(v) for v in torch.aminmax(t))
        if not (math.isfinite(lo) and math.isfinite(hi)):  # also NaN
            raise ValueError(f"{name} must hold finite values, got values in [{lo}, {hi}]")
        if lo < low or hi > high:
            bounds = f"[{low}, {high}{']' if high < math.inf else ')'}"
            raise ValueError(f"{name} must hold values in {bounds}, got values in [{lo}, {hi}]")
        if nonzero and bool((t == 0).any()):
            raise ValueError(f"{name} must hold no 0 (a division by it), got {t.tolist()!s:.60}")
    return t


def check_images(
    name: str, x: object, *, any_channels: bool = False, in_unit_range: bool = False
) -> torch.Tensor:
    """A float ``(B, C, H, W)`` batch, ``C`` 1 or 3 unless ``any_channels``, optionally in
    ``[0, 1]``."""
    x = check_image_dtype(name, x, uint8=False)
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D (B, C, H, W), got shape {tuple(x.shape)}")
    if not any_channels and x.shape[1] not in (1, 3):
        raise ValueError(f"{name} must have 1 or 3 channels, got shape {tuple(x.shape)}")
    if in_unit_range:
        check_range(name, x)
    return x


def check_order(order: object, x: torch.Tensor) -> torch.Tensor:
    """``(B, 4)`` integer rows on the device of the images ``x``, each a permutation of
    ``0..3`` where reading is free; as int64."""
    b = x.shape[0]
    if not isinstance(order, torch.Tensor) or order.shape != (b, 4) or not is_integer(order):
        got = f"{order.dtype} {tuple(order.shape)}" if isinstance(order, torch.Tensor) else order
        raise ValueError(f"order must be an integer tensor of shape ({b}, 4), got {got!s:.60}")
    check_same_device("order", order, "x", x)
    order = order.long()
    if _free_to_read(order) and not torch.equal(
        order.sort(dim=1).values, torch.arange(4).expand(b, 4)
    ):
        raise ValueError(  # a repeated op and a missing one: another jitter, no error
            f"order must hold a permutation of 0, 1, 2, 3 in every row, got {order.tolist()!s:.80}"
        )
    return order


def check_mask(name: str, mask: object, x: torch.Tensor, x_name: str = "x") -> torch.Tensor:
    """A ``(B,)`` bool tensor on the device of the images ``x``."""
    b = x.shape[0]
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"{name} must be a bool tensor of shape ({b},), got {got}")
    if mask.shape != (b,):
        raise ValueError(f"{name} must have shape ({b},), got {tuple(mask.shape)}")
    check_same_device(name, mask, x_name, x)
    return mask


def as_batch(
    images: torch.Tensor | list[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Check uint8/float images; return a (B, C, H, W) batch and (B,) heights and widths.

    A list of ``(C, H_i, W_i)`` images is zero-padded into one batch; the sizes are copied
    to the images' device without waiting (pinned memory, non-blocking).
    """
    if isinstance(images, torch.Tensor):
        batch = check_image_dtype("images", images, uint8=True)
        if batch.dim() != 4:
            shape = tuple(batch.shape)
            raise ValueError(f"images must be (B, C, H, W) or a list of (C, H, W), got {shape}")
        b, c, h, w = batch.shape
        if b == 0:
            raise ValueError("images must hold at least one image, got an empty batch")
        if c not in (1, 3):
            raise ValueError(f"images must have 1 or 3 channels, got {c} (shape {(b, c, h, w)})")
        if h == 0 or w == 0:
            raise ValueError(f"images must be at least 1 x 1 pixels, got shape {(b, c, h, w)}")
        heights = torch.full((b,), h, device=batch.device)
        widths = torch.full((b,), w, device=batch.device)
    else:
        if not isinstance(images, (list, tuple)) or len(images) == 0:
            raise ValueError(
                f"images must be a non-empty list of (C, H, W) tensors, got {images!r:.60}"
            )
        first = images[0]
        for i, im in enumerate(images):
            if not isinstance(im, torch.Tensor) or im.dim() != 3 or im.shape[0] not in (1, 3):
                shape = tuple(im.shape) if isinstance(im, torch.Tensor) else type(im).__name__
                raise ValueError(
                    f"images[{i}] must be a (C, H, W) tensor with C in (1, 3), got {shape}"
                )
            if im.shape[1] == 0 or im.shape[2] == 0:
                raise ValueError(
                    f"images[{i}] must be at least 1 x 1 pixels, got {tuple(im.shape)}"
                )
            check_image_dtype(f"images[{i}]", im, uint8=True)
            if (im.shape[0], im.dtype, im.device) != (first.shape[0], first.dtype, first.device):
                raise ValueError(f"images[{i}] must match images[0] in channels, dtype and device")
        sizes = [im.shape[1:] for im in images]
        heights, widths = to_device(torch.tensor(sizes), first.device).unbind(dim=1)
        b, c = len(images), first.shape[0]
        batch = first.new_zeros((b, c, max(h for h, _ in sizes), max(w for _, w in sizes)))
        for i, im in enumerate(images):  # one small copy per image: the sizes differ
            batch[i, :, : im.shape[1], : im.shape[2]] = im
    check_range("images", batch)  # the zero padding is in range
    return batch, heights, widths


def check_boxes(
    boxes: object, batch: torch.Tensor, heights: torch.Tensor, widths: torch.Tensor
) -> torch.Tensor:
    """``(B, 4)`` integer ``(top, left, height, width)`` boxes on the images' device.

    Returns ``(B,)`` bool: box ``i`` lies inside image ``i`` (a non-empty crop). Where the
    boxes are in host memory a box outside its image raises here; elsewhere the caller
    uses the mask without reading it.
    """
    n = batch.shape[0]
    if not isinstance(boxes, torch.Tensor):
        raise TypeError(f"boxes must be an integer tensor of shape ({n}, 4), got {type(boxes)}")
    if not is_integer(boxes):
        raise TypeError(f"boxes must have an integer dtype (e.g. torch.int64), got {boxes.dtype}")
    if boxes.shape != (n, 4):
        raise ValueError(
            f"boxes must be an integer tensor of shape ({n}, 4), got {tuple(boxes.shape)}"
        )
    check_same_device("boxes", boxes, "images", batch)
    top, left, height, width = boxes.long().unbind(dim=1)
    inside = (top >= 0) & (left >= 0) & (height >= 1) & (width >= 1)
    inside &= (height <= heights - top) & (width <= widths - left)  # no int64 overflow
    if _free_to_read(boxes) and not bool(inside.all()):
        i = int((~inside).nonzero()[0, 0])
        t, lf, bh, bw = boxes[i].tolist()
        h, w = int(heights[i]), int(widths[i])
        raise ValueError(
            f"boxes[{i}] = (top {t}, left {lf}, height {bh}, width {bw}) must lie inside "
            f"image {i} of height {h} and width {w}: top, left >= 0, height, width >= 1, "
            f"top + height <= {h}, left + width <= {w}"
        )
    return inside


def check_vector(name: str, v: object, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """A real (not bool, not complex) ``(n,)`` tensor on the device of the images ``x``,
    ``n = x.shape[dim]`` (a value per sample, or per channel)."""
    n = x.shape[dim]
    if not isinstance(v, torch.Tensor) or v.shape != (n,):
        got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        raise ValueError(f"{name} must be a tensor of shape ({n},), got {got}")
    if v.is_complex() or v.dtype == torch.bool:
        raise TypeError(f"{name} must be a real tensor, got dtype {v.dtype}")
    check_same_device(name, v, "x", x)
    return v


def check_per_view(name: str, value: object) -> tuple[float, float]:
    """A recipe's per-view probability: one number for both views, or a pair
    ``(view one, view two)``. Returns the pair; ranges are checked by ``ViewRecipe``."""
    expected = "a probability (both views) or a pair of them (view one, view two)"
    if is_real(value):
        return float(value), float(value)
    if not isinstance(value, (tuple, list)):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__} {value!r:.60}")
    if len(value) != 2:
        raise ValueError(f"{name} must be {expected}, got length {len(value)}: {value!r:.60}")
    for item in value:
        if not is_real(item):
            raise TypeError(
                f"{name} must be {expected}, got {value!r:.60} (holding a {type(item).__name__})"
            )
    return float(value[0]), float(value[1])
