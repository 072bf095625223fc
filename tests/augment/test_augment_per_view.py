"""Every per-view probability of every recipe takes one number (both views) or a pair
(view one, view two); anything else is a one-line TypeError/ValueError naming it."""

from __future__ import annotations

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

# the per-view probabilities each recipe has, written out from the papers' recipes
PROBABILITIES = {
    MoCoV1Augment: ["jitter_p", "grayscale_p", "flip_p"],
    MoCoV2Augment: ["jitter_p", "grayscale_p", "blur_p", "flip_p"],
    MoCoV3Augment: ["jitter_p", "grayscale_p", "blur_p", "solarize_p", "flip_p"],
}
CASES = [(recipe, name) for recipe, names in PROBABILITIES.items() for name in names]
IDS = [f"{recipe.__name__}-{name}" for recipe, name in CASES]
EXPECTED = "a probability (both views) or a pair of them (view one, view two)"


@pytest.mark.parametrize(("recipe", "name"), CASES, ids=IDS)
def test_one_number_sets_both_views(recipe: type, name: str) -> None:
    aug = recipe(size=8, **{name: 0.25})
    assert getattr(aug.view_one, name) == 0.25
    assert getattr(aug.view_two, name) == 0.25


@pytest.mark.parametrize(("recipe", "name"), CASES, ids=IDS)
def test_a_pair_sets_each_view(recipe: type, name: str) -> None:
    for pair in ((0.25, 0.75), [1, 0]):  # a list and ints are fine too
        aug = recipe(size=8, **{name: pair})
        assert (getattr(aug.view_one, name), getattr(aug.view_two, name)) == tuple(pair)


@pytest.mark.parametrize(("recipe", "name"), CASES, ids=IDS)
@pytest.mark.parametrize(
    ("value", "error", "got"),
    [
        ((1.0,), ValueError, "got length 1: (1.0,)"),
        ((1.0, 0.1, 0.5), ValueError, "got length 3: (1.0, 0.1, 0.5)"),
        ((), ValueError, "got length 0: ()"),
        ("0.5", TypeError, "got str '0.5'"),
        (None, TypeError, "got NoneType None"),
        (True, TypeError, "got bool True"),
        ((1.0, "a"), TypeError, "got (1.0, 'a') (holding a str)"),
        ((0.5, True), TypeError, "got (0.5, True) (holding a bool)"),
    ],
    ids=["one", "three", "empty", "str", "none", "bool", "pair-with-str", "pair-with-bool"],
)
def test_anything_else_is_refused_naming_the_argument(
    recipe: type, name: str, value: object, error: type[Exception], got: str
) -> None:
    with pytest.raises(error) as info:
        recipe(size=8, **{name: value})
    assert str(info.value) == f"{name} must be {EXPECTED}, {got}"


@pytest.mark.parametrize(("recipe", "name"), CASES, ids=IDS)
def test_out_of_range_values_name_the_view(recipe: type, name: str) -> None:
    with pytest.raises(ValueError) as info:
        recipe(size=8, **{name: (0.5, 1.5)})
    assert str(info.value) == f"view_two {name} must be in [0, 1], got 1.5"
    with pytest.raises(ValueError) as info:
        recipe(size=8, **{name: -0.5})
    assert str(info.value) == f"view_one {name} must be in [0, 1], got -0.5"
    with pytest.raises(ValueError) as info:
        recipe(size=8, **{name: float("nan")})
    assert str(info.value) == f"view_one {name} must be in [0, 1], got nan"


def test_the_reported_calls() -> None:
    """The calls of the report: each crashed with an unrelated error or was accepted."""
    v3 = MoCoV3Augment(32, blur_p=0.5)
    assert (v3.view_one.blur_p, v3.view_two.blur_p) == (0.5, 0.5)
    assert (v3.view_one.solarize_p, v3.view_two.solarize_p) == (0.0, 0.2)  # the default
    v3 = MoCoV3Augment(32, solarize_p=0.2)
    assert (v3.view_one.solarize_p, v3.view_two.solarize_p) == (0.2, 0.2)
    assert (v3.view_one.blur_p, v3.view_two.blur_p) == (1.0, 0.1)  # the default
    one, two = v3(torch.rand(2, 3, 40, 40), torch.Generator().manual_seed(0))
    assert one.shape == two.shape == (2, 3, 32, 32)
    v2 = MoCoV2Augment(blur_p=(1, 0.1))
    assert (v2.view_one.blur_p, v2.view_two.blur_p) == (1.0, 0.1)
    assert v2.view_one.jitter_p == v2.view_two.jitter_p == 0.8  # the others stay shared


def test_a_pair_reaches_the_sampling_of_each_view() -> None:
    """grayscale_p=(1, 0): every first view is gray, no second view is."""
    aug = MoCoV1Augment(size=16, grayscale_p=(1.0, 0.0), jitter_p=0.0)
    images = torch.rand(6, 3, 24, 24)
    images[:, 0] = 1.0  # saturated red: never gray by chance
    one, two = aug(images, torch.Generator().manual_seed(0))
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    gray_one = (one * std + mean).std(dim=1)  # (B, S, S): spread across the channels
    gray_two = (two * std + mean).std(dim=1)
    assert gray_one.amax() < 1e-4
    assert (gray_two.flatten(1).mean(dim=1) > 0.1).all()


@pytest.mark.parametrize(
    ("field", "value", "error", "message"),
    [
        (
            "blur_p",
            (1, 0.1),
            TypeError,
            "view_one blur_p must be a real number, got tuple",
        ),
        (
            "flip_p",
            "0.5",
            TypeError,
            "view_one flip_p must be a real number, got str",
        ),
        ("hue", None, TypeError, "view_one hue must be a real number, got None"),
        (
            "scale",
            (0.2, 0.5, 1.0),
            TypeError,
            "view_one scale must be a pair (low, high) of real numbers, got (0.2, 0.5, 1.0)",
        ),
        (
            "blur_sigma",
            0.5,
            TypeError,
            "view_one blur_sigma must be a pair (low, high) of real numbers, got 0.5",
        ),
    ],
)
def test_view_recipe_check_names_the_field_instead_of_crashing(
    field: str, value: object, error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as info:
        ViewRecipe(**{field: value}).check("view_one")  # type: ignore[arg-type]
    assert str(info.value) == message
