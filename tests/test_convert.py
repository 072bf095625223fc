"""momentum_contrast.convert on this project's checkpoints: the converted backbone loads
into torchvision and timm and computes the same features, in float64, for both encoders."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import pytest
import timm
import torch
import torchvision
from conftest import perturb_
from torch import nn

from momentum_contrast import (
    MomentumEncoder,
    moco_v2_head,
    moco_v3_predictor,
    moco_v3_projector,
    strip_classifier,
)
from momentum_contrast.convert import backbone_state_dict, main


def features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model = model.double().eval()
    with torch.no_grad():
        return model(x)


def v2_checkpoint(arch: str, ddp: bool) -> tuple[dict[str, Any], nn.Module, nn.Module]:
    """A checkpoint as the example scripts write it, and the query/key backbones."""
    torch.manual_seed(0)
    backbone, dim = strip_classifier(getattr(torchvision.models, arch)())
    model = nn.Sequential(backbone, moco_v2_head(dim, out_dim=16))
    key_encoder = MomentumEncoder(model)
    perturb_(model, scale=0.01)  # the query encoder moves on: query != key
    state = model.state_dict()
    if ddp:  # what DistributedDataParallel's state_dict looked like
        state = {f"module.{k}": v for k, v in state.items()}
    ckpt = {"recipe": "moco_v2", "model": state, "key_encoder": key_encoder.state_dict()}
    return ckpt, model[0], cast(nn.Sequential, key_encoder.key_encoder)[0]


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("encoder", ["query", "key"])
def test_resnet_loads_into_torchvision_and_timm_with_the_same_features(
    arch: str, encoder: str, tmp_path: Path
) -> None:
    ckpt, query, key = v2_checkpoint(arch, ddp=encoder == "key")
    src = tmp_path / "checkpoint.pt"
    torch.save(ckpt, src)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    expected = features(query if encoder == "query" else key, x)

    dst = tmp_path / "backbone.pth"
    assert main([str(src), str(dst), "--to", "torchvision", "--encoder", encoder]) == 0
    tv = getattr(torchvision.models, arch)()
    result = tv.load_state_dict(torch.load(dst, weights_only=True), strict=False)
    assert result.missing_keys == ["fc.weight", "fc.bias"] and result.unexpected_keys == []
    tv.fc = nn.Identity()
    torch.testing.assert_close(features(tv, x), expected, rtol=0, atol=1e-10)

    timm_dst = tmp_path / "backbone_timm.pth"
    assert main([str(src), str(timm_dst), "--to", "timm", "--encoder", encoder]) == 0
    tm = timm.create_model(arch, num_classes=0, pretrained=False)
    tm.load_state_dict(torch.load(timm_dst, weights_only=True), strict=True)
    torch.testing.assert_close(features(tm, x), expected, rtol=0, atol=1e-10)


def vit_small_torchvision() -> nn.Module:
    """The example scripts' ``vit_small``: torchvision's VisionTransformer at ViT-S/16 size,
    with the 12 attention heads of the MoCo v3 paper."""
    return torchvision.models.VisionTransformer(224, 16, 12, 12, 384, 1536)


@pytest.mark.parametrize("encoder", ["query", "key"])
def test_vit_small_loads_into_timm_and_torchvision_with_the_same_features(encoder: str) -> None:
    torch.manual_seed(0)
    backbone, dim = strip_classifier(vit_small_torchvision())
    base = nn.Sequential(backbone, moco_v3_projector(dim, hidden_dim=64, out_dim=32, num_layers=3))
    query = nn.Sequential(base, moco_v3_predictor(32, hidden_dim=64, last_bn=True))
    key_encoder = MomentumEncoder(base)
    perturb_(base, scale=0.01)
    ckpt = {
        "recipe": "moco_v3",
        "model": query.state_dict(),
        "key_encoder": key_encoder.state_dict(),
        "num_heads": 12,  # what the example scripts record
    }
    x = torch.randn(2, 3, 224, 224, dtype=torch.float64)
    key_base = cast(nn.Sequential, key_encoder.key_encoder)
    expected = features(base[0] if encoder == "query" else key_base[0], x)

    tm = timm.create_model("vit_small_patch16_224", num_classes=0, num_heads=12)
    tm.load_state_dict(backbone_state_dict(ckpt, encoder=encoder, to="timm"), strict=True)  # type: ignore[arg-type]
    torch.testing.assert_close(features(tm, x), expected, rtol=0, atol=1e-9)

    tv = vit_small_torchvision()
    result = tv.load_state_dict(
        backbone_state_dict(ckpt, encoder=encoder, to="torchvision"),  # type: ignore[arg-type]
        strict=False,
    )
    assert result.missing_keys == ["heads.head.weight", "heads.head.bias"]
    assert result.unexpected_keys == []
    tv.heads = nn.Identity()
    torch.testing.assert_close(features(tv, x), expected, rtol=0, atol=1e-9)


def test_from_a_momentum_encoder_or_a_model_in_a_loop() -> None:
    backbone, dim = strip_classifier(torchvision.models.resnet18())
    model = nn.Sequential(backbone, moco_v2_head(dim))
    key_encoder = MomentumEncoder(model)
    perturb_(model)
    from_model = backbone_state_dict(model)
    from_query = backbone_state_dict(key_encoder)
    from_key = backbone_state_dict(key_encoder, encoder="key")
    assert from_model.keys() == from_query.keys() == from_key.keys()
    assert not any(k.startswith("fc.") for k in from_model)
    # (get_parameter: model[0].conv1.weight and key_encoder.key_encoder[0]'s, typed)
    assert torch.equal(from_query["conv1.weight"], model.get_parameter("0.conv1.weight"))
    key_conv1 = key_encoder.key_encoder.get_parameter("0.conv1.weight")
    assert torch.equal(from_key["conv1.weight"], key_conv1)
    assert not torch.equal(from_query["conv1.weight"], from_key["conv1.weight"])


def test_command_line_runs_as_a_module(tmp_path: Path) -> None:
    ckpt, _, _ = v2_checkpoint("resnet18", ddp=False)
    torch.save(ckpt, tmp_path / "c.pt")
    done = subprocess.run(
        [sys.executable, "-m", "momentum_contrast.convert", str(tmp_path / "c.pt"),
         str(tmp_path / "b.pth"), "--to", "torchvision"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stdout
    assert "conv1.weight" in torch.load(tmp_path / "b.pth", weights_only=True)
