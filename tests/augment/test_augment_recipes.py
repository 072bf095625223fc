"""The v1/v2/v3 recipe modules: outputs, reproducibility, input forms and bad input."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from momentum_contrast.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MoCoV1Augment,
    MoCoV2Augment,
    MoCoV3Augment,
    ViewRecipe,
)

RECIPES = [MoCoV1Augment, MoCoV2Augment, MoCoV3Augment]
MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def uint8_batch(b: int = 4, h: int = 45, w: int = 60, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize("recipe", RECIPES)
def test_two_views_shape_dtype_range(recipe: type) -> None:
    aug = recipe(size=32)
    for images in (uint8_batch(), uint8_batch().float() / 255):
        one, two = aug(images, torch.Generator().manual_seed(0))
        for view in (one, two):
            assert view.shape == (4, 3, 32, 32) and view.dtype == torch.float32
            assert torch.isfinite(view).all()
            pixels = view * STD + MEAN  # undo the normalisation: back in [0, 1]
            assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
        assert not torch.allclose(one, two)  # two different views


@pytest.mark.parametrize("recipe", RECIPES)
def test_reproducible_from_a_generator_or_the_global_seed(recipe: type) -> None:
    aug, images = recipe(size=24), uint8_batch()
    a = aug(images, torch.Generator().manual_seed(7))
    b = aug(images, torch.Generator().manual_seed(7))
    c = aug(images, torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    torch.manual_seed(3)
    d = aug(images)
    torch.manual_seed(3)
    e = aug(images)
    assert torch.equal(d[0], e[0]) and torch.equal(d[1], e[1])


def test_uint8_and_float_inputs_agree() -> None:
    aug, images = MoCoV2Augment(size=24), uint8_batch()
    from_uint8 = aug(images, torch.Generator().manual_seed(1))
    from_float = aug(images.float() / 255, torch.Generator().manual_seed(1))
    for a, b in zip(from_uint8, from_float, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_list_of_sizes_and_equal_list_matches_batch() -> None:
    aug = MoCoV3Augment(size=24)
    images = uint8_batch(3)
    batch_views = aug(images, torch.Generator().manual_seed(2))
    list_views = aug(list(images), torch.Generator().manual_seed(2))
    for a, b in zip(batch_views, list_views, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    mixed = [
        uint8_batch(1, h, w, seed=i)[0] for i, (h, w) in enumerate([(30, 90), (120, 40), (64, 64)])
    ]
    one, two = aug(mixed)
    assert one.shape == two.shape == (3, 3, 24, 24)
    assert torch.isfinite(one).all() and torch.isfinite(two).all()


def test_grayscale_input_becomes_three_equal_channels() -> None:
    gray = uint8_batch(2)[:, :1]
    one, _ = MoCoV2Augment(size=16)(gray)
    pixels = one * STD + MEAN
    torch.testing.assert_close(pixels[:, 0], pixels[:, 1], rtol=0, atol=1e-5)
    torch.testing.assert_close(pixels[:, 0], pixels[:, 2], rtol=0, atol=1e-5)


def test_v3_views_are_asymmetric() -> None:
    aug = MoCoV3Augment(size=16)
    assert aug.view_one.blur_p == 1.0 and aug.view_two.blur_p == 0.1
    assert aug.view_one.solarize_p == 0.0 and aug.view_two.solarize_p == 0.2


def test_constructor_arguments_reach_the_views() -> None:
    aug = MoCoV2Augment(size=16, jitter_p=0.3, blur_p=0.0, scale=(0.5, 0.9), grayscale_p=1.0)
    assert (aug.view_one.jitter_p, aug.view_one.blur_p, aug.view_one.scale) == (
        0.3,
        0.0,
        (0.5, 0.9),
    )
    one, _ = aug(uint8_batch())
    pixels = one * STD + MEAN  # grayscale_p = 1: every view is gray
    torch.testing.assert_close(pixels[:, 0], pixels[:, 1], rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("make", "call", "message"),
    [
        (lambda: MoCoV2Augment(size=16), lambda a: a(torch.rand(3, 20, 20)), "(B, C, H, W)"),
        (
            lambda: MoCoV2Augment(size=16),
            lambda a: a(torch.rand(2, 4, 20, 20)),
            "1 or 3 channels, got 4",
        ),
        (
            lambda: MoCoV2Augment(size=16),
            lambda a: a(torch.rand(2, 2, 20, 20)),
            "1 or 3 channels, got 2",
        ),
        (lambda: MoCoV2Augment(size=16), lambda a: a(torch.rand(0, 3, 20, 20)), "empty batch"),
        (lambda: MoCoV2Augment(size=16), lambda a: a([]), "non-empty list"),
        (
            lambda: MoCoV2Augment(size=16),
            lambda a: a([torch.rand(20, 20)]),
            "images[0] must be a (C, H, W)",
        ),
        (
            lambda: MoCoV2Augment(size=16),
            lambda a: a([torch.rand(3, 9, 9), torch.rand(1, 9, 9)]),
            "images[1] must match",
        ),
        (lambda: MoCoV2Augment(size=100_000), None, "size must be an int in [1, 4096], got 100000"),
        (lambda: MoCoV2Augment(size=0), None, "size must be an int in [1, 4096], got 0"),
        (
            lambda: MoCoV2Augment(blur_p=-0.1),
            None,
            "blur_p must be in [0, 1], got -0.1",
        ),
        (lambda: MoCoV1Augment(grayscale_p=1.5), None, "grayscale_p must be in [0, 1]"),
        (lambda: MoCoV3Augment(solarize_p=(0.0, -1.0)), None, "view_two solarize_p"),
        (lambda: MoCoV2Augment(scale=(0.0, 1.0)), None, "scale must satisfy 0 < low <= high <= 1"),
        (
            lambda: MoCoV2Augment(jitter=(0.4, 0.4, 0.4, 0.7)),
            None,
            "hue must be in [0, 0.5], got 0.7",
        ),
        (
            lambda: MoCoV2Augment(blur_kernel_size=22),
            None,
            "blur_kernel_size must be a positive odd int",
        ),
    ],
)
def test_bad_input_is_reported(make, call, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError) as info:
        aug = make()
        call(aug)
    assert message in str(info.value)


def test_half_precision_pipeline_stays_close_to_float32() -> None:
    images = uint8_batch()
    full = MoCoV2Augment(size=24)(images, torch.Generator().manual_seed(4))
    half = MoCoV2Augment(size=24, dtype=torch.float16, resample_dtype=torch.float16)(
        images, torch.Generator().manual_seed(4)
    )
    for a, b in zip(full, half, strict=True):
        assert b.dtype == torch.float16
        torch.testing.assert_close(b.float(), a, rtol=0, atol=3e-2)  # normalised units


def test_dtype_must_be_floating() -> None:
    with pytest.raises(TypeError, match=r"dtype must be a floating-point torch\.dtype"):
        MoCoV2Augment(dtype=torch.uint8)


def test_compiled_colour_stages_equal_eager() -> None:
    images = uint8_batch(4, 40, 50)
    for recipe in (MoCoV1Augment, MoCoV3Augment):
        eager = recipe(size=24)(images, torch.Generator().manual_seed(9))
        fused = recipe(size=24, compile=True)(images, torch.Generator().manual_seed(9))
        for a, b in zip(eager, fused, strict=True):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "call",
    [
        lambda: ViewRecipe((0.2, 1.0)),  # type: ignore[misc]
        lambda: ViewRecipe(True),  # type: ignore[misc, arg-type]
        lambda: ViewRecipe((0.2, 1.0), (0.75, 1.33), 0.4, 0.4, 0.4, 0.1),  # type: ignore[misc]
    ],
    ids=["scale", "bare-bool", "many"],
)
def test_view_recipe_takes_keywords_only(call) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(TypeError, match="positional argument"):
        call()


def test_recipes_build_the_papers_views() -> None:
    ratio = (3 / 4, 4 / 3)
    v1 = ViewRecipe(
        scale=(0.2, 1.0), ratio=ratio, hue=0.4, jitter_p=1.0, grayscale_first=True, blur_p=0.0
    )
    v2 = ViewRecipe(scale=(0.2, 1.0), ratio=ratio, grayscale_first=False, blur_p=0.5)
    v3: dict[str, Any] = {
        "scale": (0.08, 1.0),
        "ratio": ratio,
        "saturation": 0.2,
        "blur_sigma": (0.1, 2.0),
    }
    assert MoCoV1Augment().view_one == MoCoV1Augment().view_two == v1
    assert MoCoV2Augment().view_one == MoCoV2Augment().view_two == v2
    assert MoCoV3Augment().view_one == ViewRecipe(**v3, blur_p=1.0, solarize_p=0.0)
    assert MoCoV3Augment().view_two == ViewRecipe(**v3, blur_p=0.1, solarize_p=0.2)
    custom = MoCoV1Augment(jitter=(0.1, 0.2, 0.3, 0.05), flip_p=0.0).view_one
    assert (custom.brightness, custom.contrast, custom.saturation, custom.hue) == (
        0.1,
        0.2,
        0.3,
        0.05,
    )
    assert custom.flip_p == 0.0 and custom.grayscale_first


@pytest.mark.parametrize("recipe", RECIPES)
def test_jitter_must_have_four_values(recipe: type) -> None:
    with pytest.raises(ValueError, match=r"jitter must be 4 numbers .*, got \(0.4, 0.4, 0.4\)"):
        recipe(jitter=(0.4, 0.4, 0.4))
