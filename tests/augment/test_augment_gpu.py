"""CUDA checks of the augmentation: same result as the CPU, no host synchronisation."""

from __future__ import annotations

import pytest
import torch

from momentum_contrast.augment import MoCoV1Augment, MoCoV2Augment, MoCoV3Augment
from momentum_contrast.augment import _random as random_module

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def images(b: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (b, 3, 120, 160), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize("recipe", [MoCoV1Augment, MoCoV2Augment, MoCoV3Augment])
def test_cuda_matches_cpu_for_the_same_draws(recipe: type) -> None:
    aug = recipe(size=64)
    cpu = aug(images(), torch.Generator().manual_seed(1))
    gpu = aug.cuda()(images().cuda(), torch.Generator().manual_seed(1))  # same CPU draws
    for a, b in zip(cpu, gpu, strict=True):
        assert b.is_cuda
        torch.testing.assert_close(b.cpu(), a, rtol=0, atol=2e-2)  # float16 resampling on CUDA


def test_no_host_synchronisation_on_cuda() -> None:
    aug = MoCoV3Augment(size=64).cuda()
    batch = images().cuda()
    varied = [im[:, : 100 - 7 * i, : 150 - 9 * i] for i, im in enumerate(batch)]
    aug(batch)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            aug(batch)
            aug(batch, torch.Generator().manual_seed(0))  # CPU draws, pinned async copies
            aug(varied)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_global_seed_reproduces_cuda_views() -> None:
    aug, batch = MoCoV2Augment(size=48).cuda(), images().cuda()
    torch.manual_seed(5)
    a = aug(batch)
    torch.manual_seed(5)
    b = aug(batch)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], a[1])


def test_compiled_recipe_matches_eager_on_cuda() -> None:
    batch = images().cuda()
    eager = MoCoV2Augment(size=64, dtype=torch.float16).cuda()
    fused = MoCoV2Augment(size=64, dtype=torch.float16, compile=True).cuda()
    a = eager(batch, torch.Generator().manual_seed(3))
    b = fused(batch, torch.Generator().manual_seed(3))
    for x, y in zip(a, b, strict=True):
        assert y.dtype == torch.float16
        torch.testing.assert_close(y.float(), x.float(), rtol=0, atol=3e-2)


def test_checks_read_no_values_on_cuda() -> None:
    """Out-of-range floats and a box outside its image: no sync, clamped / NaN instead."""
    from momentum_contrast.augment import functional as AF

    batch = images(4).cuda().float()  # 0-255 floats: refused on the CPU, not read here
    boxes = torch.tensor([[0, 0, 120, 160], [100, 0, 40, 40], [5, 5, 50, 50], [0, 0, 1, 1]])
    boxes = boxes.cuda()
    aug = MoCoV2Augment(size=32).cuda()
    aug(batch / 255)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        aug(batch)
        out = AF.resized_crop(batch / 255, boxes, 16)
        AF.adjust_brightness(batch, torch.ones(4, device="cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    nan = torch.isnan(out).flatten(1).all(1).cpu()
    assert nan.tolist() == [False, True, False, False]  # box 1 ends at row 140 > 120


def test_a_cuda_generator_for_cpu_images_gives_its_own_draws(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The draws of a CUDA generator reached CPU images through a copy the host did not
    wait for: read before the GPU wrote them, they were whatever the memory held."""
    aug, batch = MoCoV2Augment(size=64), images()
    busy = [torch.randn(8192, 8192, device="cuda")]

    def views() -> tuple[torch.Tensor, ...]:
        for _ in range(4):  # the GPU busy: a draw not waited for would be read too soon
            busy[0] = busy[0] @ busy[0] / 8192
        return tuple(aug(batch, torch.Generator("cuda").manual_seed(1)))

    got = views()
    monkeypatch.setattr(random_module, "to_device", lambda t, device: t.to(device))  # waited
    expected = views()
    for a, b in zip(got, expected, strict=True):
        assert not a.is_cuda
        torch.testing.assert_close(a, b, rtol=0, atol=0)
