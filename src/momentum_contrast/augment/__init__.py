"""Batched, per-sample-random MoCo augmentation that runs where the images are (pure torch).

``MoCoV1Augment``, ``MoCoV2Augment`` and ``MoCoV3Augment`` take a uint8 or float batch
(or a list of differently sized images) on any device and return two augmented,
normalised views; [`momentum_contrast.augment.functional`][] holds the batched ops.
"""

from momentum_contrast.augment import functional
from momentum_contrast.augment.moco import MoCoV1Augment, MoCoV2Augment, MoCoV3Augment
from momentum_contrast.augment.recipes import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentOptions,
    TwoViewAugment,
    ViewRecipe,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "AugmentOptions",
    "MoCoV1Augment",
    "MoCoV2Augment",
    "MoCoV3Augment",
    "TwoViewAugment",
    "ViewRecipe",
    "functional",
]
