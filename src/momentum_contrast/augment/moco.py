"""The augmentation recipes of MoCo v1, v2 and v3, with the papers' defaults."""

from __future__ import annotations

from typing import Any

from typing_extensions import Unpack

from momentum_contrast.augment.recipes import AugmentOptions, TwoViewAugment, ViewRecipe

__all__ = ["MoCoV1Augment", "MoCoV2Augment", "MoCoV3Augment"]


def _view(jitter: tuple[float, float, float, float], **fields: Any) -> ViewRecipe:
    """A ``ViewRecipe`` with the four ``ColorJitter`` strengths of ``jitter`` (a
    ``ValueError`` naming ``jitter`` unless it has four) and the crop ratio (3/4, 4/3)."""
    if not isinstance(jitter, (tuple, list)) or len(jitter) != 4:
        raise ValueError(
            f"jitter must be 4 numbers (brightness, contrast, saturation, hue), got {jitter!r}"
        )
    brightness, contrast, saturation, hue = jitter
    return ViewRecipe(
        brightness=brightness, contrast=contrast, saturation=saturation, hue=hue, **fields
    )


class MoCoV1Augment(TwoViewAugment):
    """MoCo v1 (reference ``--aug-plus`` off): crop (0.2, 1), grayscale 0.2, then color
    jitter 0.4/0.4/0.4/0.4 always, flip. Both views alike.

    The recipe's probabilities and ranges are keyword arguments with the paper's values;
    ``mean``, ``std``, ``blur_kernel_size``, ``antialias``, ``dtype``, ``resample_dtype``
    and ``compile`` go to [`TwoViewAugment`][] (the same for all three recipes).

    Examples:
        >>> import torch
        >>> from momentum_contrast.augment import MoCoV1Augment
        >>> images = torch.randint(0, 256, (4, 3, 64, 80), dtype=torch.uint8)
        >>> one, two = MoCoV1Augment(size=32)(images)
        >>> one.shape, one.dtype, bool((one != two).any())
        (torch.Size([4, 3, 32, 32]), torch.float32, True)
    """

    def __init__(
        self,
        size: int = 224,
        *,
        scale: tuple[float, float] = (0.2, 1.0),
        grayscale_p: float = 0.2,
        jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.4),
        jitter_p: float = 1.0,
        flip_p: float = 0.5,
        **options: Unpack[AugmentOptions],
    ) -> None:
        view = _view(
            jitter,
            scale=scale,
            jitter_p=jitter_p,
            grayscale_p=grayscale_p,
            grayscale_first=True,  # v1 converts to grayscale before the jitter
            flip_p=flip_p,
        )
        super().__init__(view, view, size=size, **options)


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
    """

    def __init__(
        self,
        size: int = 224,
        *,
        scale: tuple[float, float] = (0.2, 1.0),
        jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1),
        jitter_p: float = 0.8,
        grayscale_p: float = 0.2,
        blur_p: float = 0.5,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        flip_p: float = 0.5,
        **options: Unpack[AugmentOptions],
    ) -> None:
        view = _view(
            jitter,
            scale=scale,
            jitter_p=jitter_p,
            grayscale_p=grayscale_p,
            blur_p=blur_p,
            blur_sigma=blur_sigma,
            flip_p=flip_p,
        )
        super().__init__(view, view, size=size, **options)


class MoCoV3Augment(TwoViewAugment):
    """MoCo v3 (asymmetric, after BYOL): crop (0.08, 1), jitter 0.4/0.4/0.2/0.1 with p 0.8,
    grayscale 0.2, blur with p 1.0 (view one) and 0.1 (view two), solarize with p 0 and
    0.2, flip.

    Examples:
        >>> import torch
        >>> from momentum_contrast.augment import MoCoV3Augment
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> one, two = MoCoV3Augment(size=32)(torch.rand(2, 3, 48, 48))
        >>> torch.isfinite(one).all() and torch.isfinite(two).all()
        tensor(True)
    """

    def __init__(
        self,
        size: int = 224,
        *,
        scale: tuple[float, float] = (0.08, 1.0),
        jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
        jitter_p: float = 0.8,
        grayscale_p: float = 0.2,
        blur_p: tuple[float, float] = (1.0, 0.1),
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        solarize_p: tuple[float, float] = (0.0, 0.2),
        flip_p: float = 0.5,
        **options: Unpack[AugmentOptions],
    ) -> None:
        one, two = (
            _view(
                jitter,
                scale=scale,
                jitter_p=jitter_p,
                grayscale_p=grayscale_p,
                blur_p=blur_p[v],
                blur_sigma=blur_sigma,
                solarize_p=solarize_p[v],
                flip_p=flip_p,
            )
            for v in (0, 1)
        )
        super().__init__(one, two, size=size, **options)
