"""ViT helpers on torchvision and timm ViTs."""

from __future__ import annotations

import math
from typing import cast

import pytest
import timm
import torch
import torchvision

from momentum_contrast import MomentumEncoder
from momentum_contrast.vit import (
    freeze_patch_embedding,
    sincos_position_embedding,
    use_sincos_position_embedding,
)


def small_torchvision_vit() -> torchvision.models.VisionTransformer:
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64
    )


def test_sincos_values_from_the_formula() -> None:
    h, w, dim = 3, 5, 16
    emb = sincos_position_embedding(h, w, dim)
    assert emb.shape == (1, 1 + h * w, dim) and emb.dtype == torch.float32
    assert torch.equal(emb[0, 0], torch.zeros(dim))  # class token
    for r in range(h):
        for c in range(w):
            row = emb[0, 1 + r * w + c]
            for i in range(dim // 4):
                omega = 1.0 / 10000 ** (i / (dim // 4))
                expected = [
                    math.sin(r * omega),
                    math.cos(r * omega),
                    math.sin(c * omega),
                    math.cos(c * omega),
                ]
                got = [row[i], row[dim // 4 + i], row[dim // 2 + i], row[3 * dim // 4 + i]]
                for a, b in zip(got, expected, strict=True):
                    assert abs(float(a) - b) < 1e-6
    assert sincos_position_embedding(2, 2, 8, cls_token=False).shape == (1, 4, 8)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_position_embedding(2, 2, 10)


def test_torchvision_vit_helpers() -> None:
    vit = small_torchvision_vit()
    use_sincos_position_embedding(vit)
    pos = vit.encoder.pos_embedding
    assert not pos.requires_grad
    torch.testing.assert_close(pos, sincos_position_embedding(4, 4, 32))
    freeze_patch_embedding(vit)
    bound = math.sqrt(6 / (3 * 8 * 8 + 32))
    assert not vit.conv_proj.weight.requires_grad and not vit.conv_proj.bias.requires_grad
    assert vit.conv_proj.weight.abs().max() <= bound and torch.equal(
        vit.conv_proj.bias, torch.zeros(32)
    )
    # frozen pieces get no gradient and stay equal through a training step and an EMA update
    before = vit.conv_proj.weight.clone()
    opt = torch.optim.SGD([p for p in vit.parameters() if p.requires_grad], lr=0.1)
    key = MomentumEncoder(vit)
    vit(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    key.update()
    assert vit.conv_proj.weight.grad is None and torch.equal(vit.conv_proj.weight, before)
    assert torch.equal(
        cast(torchvision.models.VisionTransformer, key.key_encoder).conv_proj.weight, before
    )


def test_timm_vit_helpers() -> None:
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64)
    use_sincos_position_embedding(vit)
    torch.testing.assert_close(vit.pos_embed, sincos_position_embedding(4, 4, 192))
    assert not vit.pos_embed.requires_grad
    freeze_patch_embedding(vit)
    assert not vit.get_parameter("patch_embed.proj.weight").requires_grad
    assert vit(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_unknown_models_are_refused() -> None:
    with pytest.raises(TypeError, match="torchvision VisionTransformer"):
        freeze_patch_embedding(torchvision.models.resnet18())
    stem = [torchvision.models.vision_transformer.ConvStemConfig(4, 3, 2)]
    conv_stem = torchvision.models.VisionTransformer(32, 16, 1, 2, 8, 8, conv_stem_configs=stem)
    with pytest.raises(TypeError, match=r"one nn\.Conv2d, got VisionTransformer with Sequential"):
        freeze_patch_embedding(conv_stem)
    with pytest.raises(TypeError, match="pos_embed"):
        use_sincos_position_embedding(torchvision.models.resnet18())


def test_a_position_embedding_of_another_layout_is_refused_untouched() -> None:
    """timm's SAM ViT keeps its embedding as (1, h, w, dim): it is refused with its shape,
    not read as (1, tokens, dim) (which raised a size error or named a ``dim`` never given)."""
    sam = timm.create_model("samvit_base_patch16", pretrained=False, img_size=64, depth=1)
    before = sam.pos_embed.detach().clone()
    with pytest.raises(TypeError, match=r"for its 4 x 4 patch grid, got shape \(1, 4, 4, 768\)"):
        use_sincos_position_embedding(sam)
    assert torch.equal(sam.pos_embed, before) and sam.pos_embed.requires_grad
    short = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64)
    short.pos_embed = torch.nn.Parameter(torch.zeros(1, 10, 192))  # fewer than 1 + 16 tokens
    with pytest.raises(TypeError, match=r"got shape \(1, 10, 192\)"):
        use_sincos_position_embedding(short)


def test_freeze_draws_from_the_xavier_bound_of_the_input_channels() -> None:
    """A one-channel ViT's projection is drawn in ±sqrt(6 / (1 * 16 * 16 + dim))."""
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, in_chans=1)
    freeze_patch_embedding(vit)
    weight = vit.get_parameter("patch_embed.proj.weight")
    bound = math.sqrt(6 / (16 * 16 + 192))
    assert bound * 0.99 < weight.abs().max() <= bound  # 49,152 draws reach the bound


def test_sincos_is_float32_under_a_float64_default_dtype() -> None:
    expected = sincos_position_embedding(3, 4, 16)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        for cls_token in (True, False):
            emb = sincos_position_embedding(3, 4, 16, cls_token=cls_token)
            assert emb.dtype == torch.float32, (cls_token, emb.dtype)
        assert torch.equal(sincos_position_embedding(3, 4, 16), expected)
    finally:
        torch.set_default_dtype(previous)


def test_sincos_rows_and_columns_follow_the_row_major_patch_order() -> None:
    h, w, dim = 3, 4, 8
    emb = sincos_position_embedding(h, w, dim, cls_token=False)[0]  # (h*w, dim)
    grid = emb.view(h, w, dim)  # patch r * w + c at [r, c]
    rows, cols = grid[..., : dim // 2], grid[..., dim // 2 :]
    assert torch.equal(rows, rows[:, :1].expand(h, w, dim // 2))  # same along a row
    assert torch.equal(cols, cols[:1].expand(h, w, dim // 2))  # same down a column
    assert torch.equal(rows[1, 0, 0], torch.tensor(math.sin(1.0), dtype=torch.float32))


@pytest.mark.parametrize("temperature", [0.0, -10.0, float("nan"), float("inf")])
def test_sincos_temperature_must_be_positive(temperature: float) -> None:
    expected = f"temperature must be a finite number > 0, got {temperature}"
    with pytest.raises(ValueError, match=expected):
        sincos_position_embedding(2, 2, 8, temperature=temperature)
