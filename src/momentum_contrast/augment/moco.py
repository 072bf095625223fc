"""The augmentation recipes of MoCo v1, v2 and v3, with the papers' defaults."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from typing_extensions import Unpack

from momentum_contrast.augment._checks import check_per_view
from momentum_contrast.augment.recipes import AugmentOptions, TwoViewAugment, ViewRecipe

__all__ = ["MoCoV1Augment", "MoCoV2Augment", "MoCoV3Augment"]

PerView = float | tuple[float, float]
"""A per-view probability: one number for both views, or ``(view one, view two)``."""


def _views(
    jitter: tuple[float, float, float, float], per_view: Mapping[str, object], **shared: Any
) -> tuple[ViewRecipe, ViewRecipe]:
    """The two ``ViewRecipe``s: the four ``ColorJitter`` strengths of ``jitter`` (a
    ``ValueError`` naming ``jitter`` unless it has four), the ``shared`` fields, and each
    per-view probability (a number for both views or a pair, see ``check_per_view``)."""
    if not isinstance(jitter, (tuple, list)) or len(jitter) != 4:
        raise ValueError(
            f"jitter must be 4 numbers (brightness, contrast, saturation, hue), got {jitter!r}"
        )
    colour: dict[str, Any] = dict(
        zip(("brightness", "contrast", "saturation", "hue"), jitter, strict=True)
    )
    pairs: dict[str, Any] = {name: check_per_view(name, value) for name, value in per_view.items()}
    one, two = (
        ViewRecipe(**colour, **shared, **{n: p[v] for n, p in pairs.items()}) for v in (0, 1)
    )
    return one, two


class MoCoV1Augment(TwoViewAugment):
    """MoCo v1 (reference ``--aug-plus`` off): crop (0.2, 1), grayscale 0.2, then color
    jitter 0.4/0.4/0.4/0.4 always, flip. Both views alike.

    The recipe's probabilities and ranges are keyword arguments with the paper's values;
    ``mean``, ``std``, ``blur_kernel_size``, ``antialias``, ``dtype``, ``resample_dtype``
    and ``compile`` go to [`TwoViewAugment`][] (the same for all three recipes). Every
    probability (``*_p``) of every recipe is one number for both views or a pair
    ``(view one, view two)``; anything else raises a ``TypeError`` or ``ValueError``
    naming the argument.

    Examples:
        >>> import torch
        >>> from momentum_contrast.augment import MoCoV1Augment
        >>> images = torch.randint(0, 256, (4, 3, 64, 80), dtype=torch.uint8)
        >>> one, two = MoCoV1Augment(size=32)(images)
        >>> one.shape, one.dtype, bool((one != two).any())
        (torch.Size([4, 3, 32, 32]), torch.float32, True)
        >>> no_flip_on_two = MoCoV1Augment(size=32, flip_p=(0.5, 0.0))
        >>> no_flip_on_two.view_one.flip_p, no_flip_on_two.view_two.flip_p
        (0.5, 0.0)
    """

    def __init__(
        self,
        size: int = 224,
        *,
        scale: tuple[float, float] = (0.2, 1.0),
        grayscale_p: PerView = 0.2,
        jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.4),
        jitter_p: PerView = 1.0,
        flip_p: PerView = 0.5,
        **options: Unpack[AugmentOptions],
    ) -> None:
        one, two = _views(
            jitter,
            {"jitter_p": jitter_p, "grayscale_p": grayscale_p, "flip_p": flip_p},
            scale=scale,
            grayscale_first=True,  # v1 converts to grayscale before the jitter
        )
        super().__init__(one, two, size=size, **options)


class MoCoV2Augment(TwoViewAugment):
    """MoCo v2 (reference ``--aug-plus``): crop (0.2, 1), jitter 0.4/0.4/0.4/0.1 with p 0.8,
    grayscale 0.2, Gaussian blur sigma (0.1, 2) with p 0.5, flip. Both views alike.

    Examples:
        >>> import torch
        >>> from momentum_contrast.augment import MoCoV2Augment
        >>> images = [torch.rand(3, 60, 90), torch.rand(3, 75, 50)]  # different sizes
        >>> one, two = MoCoV2Augment(size=32)(images, torch.Generator().manual_seed(0))
        >>> one.shape
        torch.Size([2, 3, 32, 32])
        >>> MoCoV2Augment(blur_p=(1, 0.5)).view_two.blur_p  # a pair: one per view
        0.5
        >>> MoCoV2Augment(blur_p=(1.0, 0.1, 0.5))
        Traceback (most recent call last):
        ...
        ValueError: blur_p must be a probability (both views) or a pair ..., got length 3: ...
    """

    def __init__(
        self,
        size: int = 224,
        *,
        scale: tuple[float, float] = (0.2, 1.0),
        jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1),
        jitter_p: PerView = 0.8,
        grayscale_p: PerView = 0.2,
        blur_p: PerView = 0.5,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        flip_p: PerView = 0.5,
        **options: Unpack[AugmentOptions],
    ) -> None:
        per_view = {"jitter_p": jitter_p, "grayscale_p": grayscale_p, "blur_p": blur_p}
        one, two = _views(jitter, per_view | {"flip_p": flip_p}, scale=scale, blur_sigma=blur_sigma)
        super().__init__(one, two, size=size, **options)


class MoCoV3Augment(TwoViewAugment):
    """MoCo v3 (asymmetric, after BYOL): crop (0.08, 1), jitter 0.4/0.4/0.2/0.1 with p 0.8,
    grayscale 0.2, blur with p 1.0 (view one) and 0.1 (view two), solarize with p 0 and
    0.2, flip. The crop is that of the authors' ViT runs (their script's default); their
    ResNet runs crop (0.2, 1): ``scale=(0.2, 1.0)``.

    Examples:
        >>> import torch
        >>> from momentum_contrast.augment import MoCoV3Augment
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> one, two = MoCoV3Augment(size=32)(torch.rand(2, 3, 48, 48))
        >>> torch.isfinite(one).all() and torch.isfinite(two).all()
        tensor(True)
        >>> MoCoV3Augment(blur_p=0.5).view_two.blur_p  # one number: both views
        0.5
    """

    def __init__(
        self,
        size: int = 224,
        *,
        scale: tuple[float, float] = (0.08, 1.0),
        jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
        jitter_p: PerView = 0.8,
        grayscale_p: PerView = 0.2,
        blur_p: PerView = (1.0, 0.1),
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        solarize_p: PerView = (0.0, 0.2),
        flip_p: PerView = 0.5,
        **options: Unpack[AugmentOptions],
    ) -> None:
        per_view = {"jitter_p": jitter_p, "grayscale_p": grayscale_p, "blur_p": blur_p}
        per_view |= {"solarize_p": solarize_p, "flip_p": flip_p}
        one, two = _views(jitter, per_view, scale=scale, blur_sigma=blur_sigma)
        super().__init__(one, two, size=size, **options)
