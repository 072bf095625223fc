"""The MoCo v1, v2 and v3 augmentation recipes as batched GPU modules."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from typing_extensions import TypedDict

from momentum_contrast._checks import check_bool, check_float_dtype, check_unit_interval, is_real
from momentum_contrast.augment._checks import as_batch
from momentum_contrast.augment._ops import after_crop_stage, apply_resample, resized_crop_weights
from momentum_contrast.augment._random import Sampler, crop_boxes

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "AugmentOptions", "TwoViewAugment", "ViewRecipe"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
"""Per-channel mean (RGB) the recipes normalise with by default.

Examples:
    >>> from momentum_contrast.augment import IMAGENET_MEAN
    >>> IMAGENET_MEAN
    (0.485, 0.456, 0.406)
"""

IMAGENET_STD = (0.229, 0.224, 0.225)
"""Per-channel standard deviation (RGB) the recipes normalise with by default.

Examples:
    >>> from momentum_contrast.augment import IMAGENET_STD
    >>> IMAGENET_STD
    (0.229, 0.224, 0.225)
"""
MAX_SIZE = 4096  # larger outputs are a mistake, not a training resolution


@dataclass(frozen=True, kw_only=True)
class ViewRecipe:
    """What one view does, in the reference order (crop, [grayscale,] jitter, grayscale,
    blur, solarize, flip). Probabilities are per sample.

    Examples:
        >>> from momentum_contrast.augment import ViewRecipe
        >>> crop_and_flip = ViewRecipe(scale=(0.08, 1.0), jitter_p=0.0, grayscale_p=0.0)
        >>> crop_and_flip.flip_p, crop_and_flip.blur_p
        (0.5, 0.0)
    """

    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    grayscale_first: bool = False  # MoCo v1 converts to grayscale before the jitter
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    flip_p: float = 0.5

    def check(self, view: str) -> None:
        """Raise ``ValueError`` naming ``view`` and the field if a value is out of range.

        Args:
            view: how the error message names this recipe (e.g. ``"view_one"``).

        Examples:
            >>> from momentum_contrast.augment import ViewRecipe
            >>> ViewRecipe(flip_p=1.5).check("view_one")
            Traceback (most recent call last):
            ...
            ValueError: view_one flip_p must be in [0, 1], got 1.5
        """
        for name in ("jitter_p", "grayscale_p", "blur_p", "solarize_p", "flip_p"):
            check_unit_interval(f"{view} {name}", getattr(self, name))
        check_bool(f"{view} grayscale_first", self.grayscale_first)
        for name in ("brightness", "contrast", "saturation", "hue"):
            value = getattr(self, name)
            if not is_real(value):
                raise TypeError(f"{view} {name} must be a real number, got {value!r:.60}")
            if name != "hue" and not 0 <= value < math.inf:
                raise ValueError(f"{view} {name} must be finite and >= 0, got {value}")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"{view} hue must be in [0, 0.5], got {self.hue}")
        for name, high in (("scale", 1.0), ("ratio", math.inf), ("blur_sigma", math.inf)):
            pair = getattr(self, name)
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(map(is_real, pair))):
                raise TypeError(
                    f"{view} {name} must be a pair (low, high) of real numbers, got {pair!r:.60}"
                )
            if not 0.0 < pair[0] <= pair[1] <= high or pair[1] == math.inf:
                bound = " <= 1" if high == 1.0 else " < inf"
                raise ValueError(f"{view} {name} must satisfy 0 < low <= high{bound}, got {pair}")


class AugmentOptions(TypedDict, total=False):
    """Options every recipe passes on to [`TwoViewAugment`][] (see its arguments).

    Examples:
        >>> import torch
        >>> from momentum_contrast.augment import AugmentOptions, MoCoV2Augment
        >>> fast: AugmentOptions = {"dtype": torch.float16, "compile": False}
        >>> MoCoV2Augment(size=32, **fast).dtype
        torch.float16
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    blur_kernel_size: int
    antialias: bool
    dtype: torch.dtype
    resample_dtype: torch.dtype | None
    compile: bool


class TwoViewAugment(nn.Module):
    """Two independently augmented views of every image, computed batched on its device.

    Args:
        view_one: recipe of the first view.
        view_two: recipe of the second view.
        size: output side ``S`` (224 in the papers).
        mean: per-channel normalisation mean (ImageNet by default).
        std: per-channel normalisation std.
        blur_kernel_size: Gaussian kernel side (23 at 224 px, 10% of the image, as
            torchvision-based MoCo pipelines).
        antialias: antialiased downscaling in the resized crop (as PIL).
        dtype: dtype of the colour operations and of the output (``torch.float16``
            halves the memory traffic on a GPU).
        resample_dtype: dtype of the crop-and-resize matrix products; ``None`` picks
            ``torch.float16`` (tensor cores) for CUDA input and ``torch.float32`` otherwise.
        compile: fuse the elementwise colour operations with ``torch.compile`` (on a GPU
            several times fewer passes over the images; the first call compiles, and a new
            batch size or input height or width compiles again: a list of images of
            different sizes is padded to its largest, so give batches of one size, or leave
            this off; after 8 recompilations ``torch.compile`` runs the rest eagerly).

    Call with a ``(B, C, H, W)`` uint8 (0 to 255) or float (0 to 1) batch, or a list of
    ``(C, H_i, W_i)`` images of different sizes, ``C`` in {1, 3} (one channel is
    repeated to RGB, as ``PIL.Image.convert("RGB")``), and optionally a
    ``torch.Generator``. Returns ``(view_one, view_two)``, each ``(B, 3, S, S)`` in ``dtype``.

    Examples:
        >>> import torch
        >>> from momentum_contrast.augment import TwoViewAugment, ViewRecipe
        >>> strong, mild = ViewRecipe(blur_p=1.0), ViewRecipe(jitter_p=0.0)
        >>> augment = TwoViewAugment(strong, mild, size=48)
        >>> one, two = augment(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8))
        >>> one.shape, two.shape
        (torch.Size([2, 3, 48, 48]), torch.Size([2, 3, 48, 48]))
    """

    def __init__(
        self,
        view_one: ViewRecipe,
        view_two: ViewRecipe,
        *,
        size: int = 224,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        blur_kernel_size: int = 23,
        antialias: bool = True,
        dtype: torch.dtype = torch.float32,
        resample_dtype: torch.dtype | None = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.mean: torch.Tensor
        self.std: torch.Tensor
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_SIZE:
            raise ValueError(f"size must be an int in [1, {MAX_SIZE}], got {size!r}")
        for name, values in (("mean", mean), ("std", std)):
            if not isinstance(values, (tuple, list)) or not all(map(is_real, values)):
                raise TypeError(f"{name} must be real numbers, one per channel, got {values!r:.60}")
        finite = all(math.isfinite(m) for m in mean) and all(0 < s < math.inf for s in std)
        if len(mean) != 3 or len(std) != 3 or not finite:
            raise ValueError(
                f"mean and std must have 3 values, mean finite, std finite > 0; got {mean}, {std}"
            )
        if isinstance(blur_kernel_size, bool) or not isinstance(blur_kernel_size, int):
            raise TypeError(f"blur_kernel_size must be an int, got {blur_kernel_size!r}")
        if blur_kernel_size < 1 or blur_kernel_size % 2 == 0:
            raise ValueError(f"blur_kernel_size must be a positive odd int, got {blur_kernel_size}")
        view_one.check("view_one")
        view_two.check("view_two")
        self.view_one, self.view_two = view_one, view_two
        check_float_dtype("dtype", dtype)
        if resample_dtype is not None:
            check_float_dtype("resample_dtype", resample_dtype)
        self.size, self.blur_kernel_size = size, blur_kernel_size
        self.antialias = check_bool("antialias", antialias)
        self.dtype, self.resample_dtype = dtype, resample_dtype
        self._weights: Callable[..., tuple[torch.Tensor, torch.Tensor]] = resized_crop_weights
        self._stage: Callable[..., torch.Tensor] = after_crop_stage
        # compile: fuse the elementwise work between (and around) the matrix products
        if check_bool("compile", compile):
            self._weights = torch.compile(resized_crop_weights, dynamic=False)
            self._stage = torch.compile(after_crop_stage, dynamic=False)
        self.register_buffer("mean", torch.tensor(mean), persistent=False)
        self.register_buffer("std", torch.tensor(std), persistent=False)

    def forward(
        self, images: torch.Tensor | list[torch.Tensor], generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment every image twice, each view with its own random parameters per image.

        Args:
            images: ``(B, C, H, W)`` uint8 (0 to 255) or float (0 to 1) batch, or a list
                of ``B`` ``(C, H_i, W_i)`` images; ``C`` is 1 or 3. Other dtypes (integer,
                bool, complex) raise ``TypeError``. Float values outside ``[0, 1]`` raise
                ``ValueError`` for images on the CPU; on a GPU they are not read (that
                would make the host wait for the device): they enter the resize as they
                are, its output is clamped to ``[0, 1]``, and an ``inf`` or NaN pixel
                anywhere in an image makes that channel NaN.
            generator: random generator, best on the images' device (one on another device
                draws there, and its draws are copied; into host memory the host waits for
                the copy); the global one if None.

        Returns:
            ``(view_one, view_two)``, each ``(B, 3, size, size)`` in ``dtype``, normalised
            with ``mean`` and ``std``.

        Examples:
            >>> import torch
            >>> from momentum_contrast.augment import MoCoV2Augment
            >>> images = torch.randint(0, 256, (2, 3, 40, 50), dtype=torch.uint8)
            >>> one, two = MoCoV2Augment(32)(images, generator=torch.Generator().manual_seed(0))
            >>> one.shape, bool((one != two).any())
            (torch.Size([2, 3, 32, 32]), True)
        """
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(
                f"generator must be a torch.Generator or None, got {type(generator).__name__} "
                "(for a seed: torch.Generator(device).manual_seed(seed))"
            )
        batch, heights, widths = as_batch(images)
        k, blurs = self.blur_kernel_size, self.view_one.blur_p > 0 or self.view_two.blur_p > 0
        if blurs and k // 2 >= self.size:  # the blur runs on the size x size views
            raise ValueError(
                f"blur_kernel_size {k} needs size > {k // 2}, got size {self.size}: build the "
                "recipe with an odd blur_kernel_size of about a tenth of size (the papers' 23 "
                "for 224), or without blur"
            )
        sampler = Sampler(batch.device, generator)
        resample = self.resample_dtype or (
            torch.float16 if batch.device.type == "cuda" else torch.float32
        )
        scale = 1.0 if batch.is_floating_point() else 1.0 / 255.0
        pixels = batch.to(resample)  # converted once, for both views
        (b, _, h, w), views = pixels.shape, []
        for r in (self.view_one, self.view_two):
            boxes = crop_boxes(sampler, heights, widths, r.scale, r.ratio)
            flip = sampler.bernoulli(b, r.flip_p)  # folded into the resize weights
            wy, wx = self._weights(boxes, h, w, self.size, flip, self.antialias, pixels.dtype)
            x = apply_resample(pixels, wy, wx)  # (B, C, S, S)
            draws = {  # drawn in this order, which the seeds' results depend on
                "grayscale": sampler.bernoulli(b, r.grayscale_p),
                "apply": sampler.bernoulli(b, r.jitter_p),
                "brightness": sampler.uniform((b,), max(0.0, 1 - r.brightness), 1 + r.brightness),
                "contrast": sampler.uniform((b,), max(0.0, 1 - r.contrast), 1 + r.contrast),
                "saturation": sampler.uniform((b,), max(0.0, 1 - r.saturation), 1 + r.saturation),
                "hue": sampler.uniform((b,), -r.hue, r.hue),
                "order": sampler.permutations(b, 4),
            }
            if r.blur_p > 0:  # sigma 0: no blur
                sigma = sampler.uniform((b,), *r.blur_sigma)
                draws["sigma"] = torch.where(sampler.bernoulli(b, r.blur_p), sigma, 0.0)
            if r.solarize_p > 0:
                draws["solarize"] = sampler.bernoulli(b, r.solarize_p)
            statics = (self.mean, self.std, r.grayscale_first, self.blur_kernel_size, self.dtype)
            views.append(self._stage(x, draws, scale, *statics))
        return views[0], views[1]
