"""Sampling statistics over 20,000 draws (fixed seeds; KS tests at alpha = 0.001)."""

from __future__ import annotations

import itertools
import math
from typing import ClassVar

import pytest
import torch
from torchvision import transforms as T

from momentum_contrast.augment import MoCoV1Augment, MoCoV2Augment, MoCoV3Augment
from momentum_contrast.augment._random import Sampler, crop_boxes

N = 20_000
KS_ALPHA_001 = 1.949  # c(alpha) of the Kolmogorov-Smirnov test at alpha = 0.001


def ks_two_sample(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().sort().values, b.double().sort().values
    grid = torch.cat([a, b])
    fa = torch.searchsorted(a, grid, right=True) / len(a)
    fb = torch.searchsorted(b, grid, right=True) / len(b)
    return float((fa - fb).abs().max())


def ks_uniform(x: torch.Tensor, low: float, high: float) -> float:
    x = x.double().sort().values
    cdf = ((x - low) / (high - low)).clamp(0, 1)
    n = len(x)
    upper = torch.arange(1, n + 1, dtype=torch.float64) / n - cdf
    lower = cdf - torch.arange(n, dtype=torch.float64) / n
    return float(torch.maximum(upper, lower).max())


@pytest.mark.parametrize(
    ("height", "width", "scale"),
    [(375, 500, (0.2, 1.0)), (375, 500, (0.08, 1.0)), (60, 600, (0.08, 1.0))],
    ids=["v1v2-imagenet-like", "v3-imagenet-like", "panorama-with-fallbacks"],
)
def test_crop_boxes_follow_torchvision(height: int, width: int, scale: tuple[float, float]) -> None:
    ratio = (3 / 4, 4 / 3)
    sampler = Sampler(torch.device("cpu"), torch.Generator().manual_seed(0))
    boxes = crop_boxes(
        sampler, torch.full((N,), height), torch.full((N,), width), scale, ratio
    ).double()
    torch.manual_seed(0)
    img = torch.empty(3, height, width)
    ref = torch.tensor(
        [T.RandomResizedCrop.get_params(img, list(scale), list(ratio)) for _ in range(N)]
    ).double()
    # boxes lie inside the image
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= height).all()
    assert (boxes[:, 1] >= 0).all() and (boxes[:, 1] + boxes[:, 3] <= width).all()
    critical = KS_ALPHA_001 * math.sqrt(2 / N)
    area, ref_area = (
        boxes[:, 2] * boxes[:, 3] / (height * width),
        ref[:, 2] * ref[:, 3] / (height * width),
    )
    assert ks_two_sample(area, ref_area) < critical
    log_r, ref_log_r = (boxes[:, 3] / boxes[:, 2]).log(), (ref[:, 3] / ref[:, 2]).log()
    assert ks_two_sample(log_r, ref_log_r) < critical
    top_frac = boxes[:, 0] / (height - boxes[:, 2] + 1)  # placement: uniform over valid tops
    ref_top_frac = ref[:, 0] / (height - ref[:, 2] + 1)
    assert ks_two_sample(top_frac, ref_top_frac) < critical


def test_uniforms_bernoullis_and_permutations() -> None:
    sampler = Sampler(torch.device("cpu"), torch.Generator().manual_seed(1))
    critical = KS_ALPHA_001 / math.sqrt(N)
    for low, high in [(0.6, 1.4), (0.8, 1.2), (-0.1, 0.1), (0.1, 2.0)]:
        x = sampler.uniform((N,), low, high)
        assert x.min() >= low and x.max() <= high
        assert ks_uniform(x, low, high) < critical
    for p in (0.1, 0.2, 0.5, 0.8):
        hits = int(sampler.bernoulli(N, p).sum())
        sd = math.sqrt(N * p * (1 - p))
        assert abs(hits - N * p) < 4.5 * sd, (p, hits)
    perms = sampler.permutations(N, 4)
    assert torch.equal(perms.sort(dim=1).values, torch.arange(4).expand(N, 4))
    codes = (perms * torch.tensor([64, 16, 4, 1])).sum(1)
    counts = torch.bincount(codes, minlength=256)[counts_index()]
    expected, sd = N / 24, math.sqrt(N / 24 * (1 - 1 / 24))
    assert ((counts - expected).abs() < 4.5 * sd).all(), counts


def counts_index() -> torch.Tensor:
    return torch.tensor(
        [
            sum(v * w for v, w in zip(p, (64, 16, 4, 1), strict=True))
            for p in itertools.permutations(range(4))
        ]
    )


class Recorder(Sampler):
    """A Sampler that logs the ranges and probabilities a recipe asks for."""

    calls: ClassVar[list[tuple[str, float, float]]] = []

    def uniform(self, shape, low, high):  # type: ignore[no-untyped-def]
        if len(shape) == 1:
            Recorder.calls.append(("uniform", round(low, 6), round(high, 6)))
        return super().uniform(shape, low, high)

    def bernoulli(self, n, p):  # type: ignore[no-untyped-def]
        Recorder.calls.append(("bernoulli", p, 0.0))
        return super().bernoulli(n, p)


# What one view draws, in order. Probabilities (bernoulli): flip, grayscale, jitter, then
# blur and solarize when their p > 0. Ranges (uniform, per sample): the crop's placement
# (0, 1) twice, brightness, contrast, saturation, hue, then the blur sigma when blur_p > 0.
PLACE = [(0.0, 1.0), (0.0, 1.0)]
V1_RANGES = [*PLACE, (0.6, 1.4), (0.6, 1.4), (0.6, 1.4), (-0.4, 0.4)]
V2_RANGES = [*PLACE, (0.6, 1.4), (0.6, 1.4), (0.6, 1.4), (-0.1, 0.1), (0.1, 2.0)]
V3_RANGES = [*PLACE, (0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1), (0.1, 2.0)]


@pytest.mark.parametrize(
    ("recipe", "probabilities", "ranges"),
    [
        (MoCoV1Augment, [0.5, 0.2, 1.0] * 2, V1_RANGES * 2),
        (MoCoV2Augment, [0.5, 0.2, 0.8, 0.5] * 2, V2_RANGES * 2),
        # v3: view one blurs always and never solarizes; view two blurs 0.1, solarizes 0.2
        (MoCoV3Augment, [0.5, 0.2, 0.8, 1.0, 0.5, 0.2, 0.8, 0.1, 0.2], V3_RANGES * 2),
    ],
)
def test_recipes_draw_with_the_papers_parameters(
    monkeypatch: pytest.MonkeyPatch,
    recipe: type,
    probabilities: list[float],
    ranges: list[tuple[float, float]],
) -> None:
    """Compared position by position: swapping two probabilities (grayscale 0.2 and
    jitter 0.8, or the two views' blur) changes the lists."""
    from momentum_contrast.augment import recipes

    monkeypatch.setattr(recipes, "Sampler", Recorder)
    Recorder.calls = []
    recipe(size=16)(torch.rand(2, 3, 20, 20))
    assert [p for kind, p, _ in Recorder.calls if kind == "bernoulli"] == probabilities
    assert [(lo, hi) for kind, lo, hi in Recorder.calls if kind == "uniform"] == ranges


def test_swapped_probabilities_are_seen(monkeypatch: pytest.MonkeyPatch) -> None:
    """The comparison above can fail: grayscale and jitter swapped give another list."""
    from momentum_contrast.augment import recipes

    monkeypatch.setattr(recipes, "Sampler", Recorder)
    Recorder.calls = []
    MoCoV2Augment(size=16, grayscale_p=0.8, jitter_p=0.2)(torch.rand(2, 3, 20, 20))
    assert [p for kind, p, _ in Recorder.calls if kind == "bernoulli"] == [0.5, 0.8, 0.2, 0.5] * 2
