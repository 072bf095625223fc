"""Each batched op equals torchvision.transforms.v2.functional applied per sample."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from momentum_contrast.augment import functional as AF

B = 6


@pytest.fixture
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(B, 3, 37, 53, generator=g)
    x[0] = 0.5  # a flat image (zero chroma)
    x[1, :, :5] = 1.0  # saturated pixels
    return x


def per_sample(
    fn: Callable[..., torch.Tensor], x: torch.Tensor, *params: Sequence[object]
) -> torch.Tensor:
    return torch.stack([fn(x[i], *(p[i] for p in params)) for i in range(x.shape[0])])


FACTORS = [0.0, 0.5, 0.9, 1.0, 1.3, 1.8]
HUES = [-0.5, -0.2, 0.0, 0.05, 0.3, 0.5]


@pytest.mark.parametrize(
    ("ours", "theirs", "values"),
    [
        (AF.adjust_brightness, TF.adjust_brightness, FACTORS),
        (AF.adjust_contrast, TF.adjust_contrast, FACTORS),
        (AF.adjust_saturation, TF.adjust_saturation, FACTORS),
        (AF.adjust_hue, TF.adjust_hue, HUES),
    ],
    ids=["brightness", "contrast", "saturation", "hue"],
)
def test_colour_ops(ours, theirs, values, images) -> None:  # type: ignore[no-untyped-def]
    got = ours(images, torch.tensor(values))
    torch.testing.assert_close(got, per_sample(theirs, images, values), rtol=0, atol=1e-4)


def test_grayscale(images: torch.Tensor) -> None:
    expected = per_sample(lambda im: TF.rgb_to_grayscale(im, num_output_channels=1), images)
    torch.testing.assert_close(AF.grayscale(images), expected, rtol=0, atol=1e-4)


def test_color_jitter_in_every_order(images: torch.Tensor) -> None:
    g = torch.Generator().manual_seed(1)
    orders = torch.tensor(list(itertools.permutations(range(4))))  # all 24
    n = len(orders)
    x = images.repeat(4, 1, 1, 1)[:n]
    b, c, s = (0.6 + 0.8 * torch.rand(n, generator=g) for _ in range(3))
    h = 0.8 * torch.rand(n, generator=g) - 0.4
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    expected = []
    for i in range(n):
        im = x[i]
        for op in orders[i].tolist():
            im = ops[op](im, [b, c, s, h][op][i].item())
        expected.append(im)
    apply = torch.ones(n, dtype=torch.bool)
    apply[::5] = False
    got = AF.color_jitter(x, b, c, s, h, orders, apply)
    want = torch.where(apply.view(-1, 1, 1, 1), torch.stack(expected), x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert torch.equal(got[~apply], x[~apply])  # skipped samples untouched, bit for bit


def test_gaussian_blur(images: torch.Tensor) -> None:
    sigmas = [0.1, 0.5, 1.0, 1.7, 2.0, 3.0]
    got = AF.gaussian_blur(images, torch.tensor(sigmas), kernel_size=23)
    expected = per_sample(lambda im, s: TF.gaussian_blur(im, [23, 23], [s, s]), images, sigmas)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    still = AF.gaussian_blur(images, torch.zeros(B), kernel_size=23)  # sigma 0: no blur
    assert torch.equal(still, images)


def test_solarize_and_flip(images: torch.Tensor) -> None:
    apply = torch.tensor([True, False, True, True, False, True])
    expected = torch.stack(
        [TF.solarize(im, 0.5) if a else im for im, a in zip(images, apply, strict=True)]
    )
    torch.testing.assert_close(AF.solarize(images, apply), expected, rtol=0, atol=1e-6)
    expected = torch.stack(
        [TF.horizontal_flip(im) if a else im for im, a in zip(images, apply, strict=True)]
    )
    assert torch.equal(AF.hflip(images, apply), expected)


@pytest.mark.parametrize("size", [16, 24, 80])  # downscale with antialias, and upscale
def test_resized_crop(images: torch.Tensor, size: int) -> None:
    boxes = torch.tensor(
        [
            [0, 0, 37, 53],
            [5, 7, 20, 30],
            [10, 3, 27, 41],
            [1, 2, 3, 4],
            [0, 10, 37, 12],
            [30, 50, 7, 3],
        ]
    )
    expected = torch.stack(
        [
            TF.resized_crop(im, *box.tolist(), [size, size], antialias=True)
            for im, box in zip(images, boxes, strict=True)
        ]
    )
    got = AF.resized_crop(images, boxes, size)
    # the weights are the same as torchvision's, so borders match as tightly as the inside
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    flip = torch.tensor([True, False] * 3)
    flipped = AF.resized_crop(images, boxes, size, flip=flip)
    torch.testing.assert_close(flipped, AF.hflip(got, flip), rtol=0, atol=1e-6)


def test_resized_crop_uint8_and_variable_sizes() -> None:
    g = torch.Generator().manual_seed(2)
    ims = [
        torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
        for h, w in [(40, 60), (75, 50), (33, 33)]
    ]
    boxes = torch.tensor([[2, 3, 30, 40], [10, 0, 60, 50], [0, 0, 33, 33]])
    got = AF.resized_crop(ims, boxes, 24)
    expected = torch.stack(
        [
            TF.resized_crop(im.float() / 255, *b.tolist(), [24, 24], antialias=True)
            for im, b in zip(ims, boxes, strict=True)
        ]
    )
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_normalize(images: torch.Tensor) -> None:
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    expected = TF.normalize(images, mean.tolist(), std.tolist())
    torch.testing.assert_close(AF.normalize(images, mean, std), expected, rtol=0, atol=1e-6)


def test_per_sample_parameters_must_match_the_batch(images: torch.Tensor) -> None:
    with pytest.raises(ValueError, match=r"shape \(6,\), got \(5,\)"):
        AF.adjust_brightness(images, torch.ones(5))
    with pytest.raises(
        ValueError, match=r"boxes must be an integer tensor of shape \(6, 4\), got \(6, 3\)"
    ):
        AF.resized_crop(images, torch.zeros(6, 3, dtype=torch.long), 8)
    with pytest.raises(ValueError, match="kernel_size must be a positive odd int, got 4"):
        AF.gaussian_blur(images, torch.ones(B), kernel_size=4)
    small = images[:, :, :11, :]  # reflection padding needs more than kernel_size // 2 rows
    with pytest.raises(ValueError, match="kernel_size 23 needs images larger than 11 px"):
        AF.gaussian_blur(small, torch.ones(B), kernel_size=23)


@pytest.mark.parametrize("k", [3, 9, 23])
def test_blur_matches_torchvision_at_every_kernel_size(images: torch.Tensor, k: int) -> None:
    sigmas = [0.05, 0.1, 0.7, 1.2, 2.0, 3.0]
    expected = per_sample(lambda im, s: TF.gaussian_blur(im, [k, k], [s, s]), images, sigmas)
    got = AF.gaussian_blur(images, torch.tensor(sigmas), k)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
