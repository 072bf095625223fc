"""A ViT's attention heads are not in its weights: momentum_contrast.convert reads them from
a record (the MoCo v3 authors' architecture names, this project's checkpoints, a module,
an argument), every conversion states the model to build, and a timm ViT that pools
otherwise than torchvision's is refused, not silently converted."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import torchvision
from torch import nn

from momentum_contrast import MomentumEncoder, moco_v3_predictor, moco_v3_projector
from momentum_contrast.convert import (
    LayoutError,
    ModelSpec,
    backbone_spec,
    backbone_state_dict,
    load_official_checkpoint,
    main,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.double().eval()(x)


def authors_vit_small() -> tuple[dict[str, Any], nn.Module]:
    """The MoCo v3 authors' ViT-S checkpoint layout: 12 heads (their vits.py), timm names,
    the projector at ``head``, ``arch: "vit_small"``; and that ViT without its projector."""
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch16_224", num_classes=0, num_heads=12)
    vit.head = moco_v3_projector(384, hidden_dim=64, out_dim=32, num_layers=3)
    state = {f"module.base_encoder.{k}": v for k, v in vit.state_dict().items()}
    state |= {f"module.momentum_encoder.{k}": v.clone() for k, v in vit.state_dict().items()}
    predictor = moco_v3_predictor(32, hidden_dim=64)
    state |= {f"module.predictor.{k}": v for k, v in predictor.state_dict().items()}
    vit.head = nn.Identity()
    return {"epoch": 300, "arch": "vit_small", "state_dict": state}, vit


TV_KWARGS = {"image_size": 224, "patch_size": 16, "num_layers": 12, "num_heads": 12,
             "hidden_dim": 384, "mlp_dim": 1536}  # fmt: skip
SPECS = {  # written from the authors' ViT-S: 224 px, 16-px patches, 12 x (384 wide, 12 heads)
    "torchvision": ModelSpec("torchvision.models.VisionTransformer", (), TV_KWARGS),
    "timm": ModelSpec(
        "timm.create_model", ("vit_small_patch16_224",), {"num_classes": 0, "num_heads": 12}
    ),
}


@pytest.mark.parametrize("to", ["torchvision", "timm"])
def test_the_authors_vit_small_becomes_a_12_head_model_with_their_features(to: str) -> None:
    ckpt, vit = authors_vit_small()
    spec = backbone_spec(ckpt, to=to)  # type: ignore[arg-type]
    assert spec == SPECS[to]
    model = spec.build()
    loaded = model.load_state_dict(backbone_state_dict(ckpt, to=to), strict=False)  # type: ignore[arg-type]
    head = ["heads.head.weight", "heads.head.bias"] if to == "torchvision" else []
    assert loaded.missing_keys == head and loaded.unexpected_keys == []
    if to == "torchvision":
        model.heads = nn.Identity()
    heads = {m.num_heads for m in model.modules() if hasattr(m, "num_heads")}
    assert heads == {12}
    x = torch.randn(2, 3, 224, 224, dtype=torch.float64)
    torch.testing.assert_close(features(model, x), features(vit, x), rtol=0, atol=1e-9)


def test_the_command_line_prints_and_stores_the_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt, _ = authors_vit_small()
    torch.save(ckpt, src := tmp_path / "vit-s-300ep.pth.tar")
    dst = tmp_path / "vit_s.pth"
    assert main([str(src), str(dst), "--to", "timm"]) == 0
    assert "timm.create_model('vit_small_patch16_224', num_classes=0, num_heads=12)" in (
        capsys.readouterr().out
    )
    saved = torch.load(dst, weights_only=True)
    record = saved.pop("__model__")
    assert record["builder"] == "timm.create_model"
    assert record["args"] == ["vit_small_patch16_224"]
    assert record["kwargs"] == {"num_classes": 0, "num_heads": 12}
    model = timm.create_model(*record["args"], **record["kwargs"])
    model.load_state_dict(saved)  # strict
    # converted again, the file's record still says 12 heads
    tv = tmp_path / "vit_s_tv.pth"
    assert main([str(dst), str(tv), "--to", "torchvision"]) == 0
    assert torch.load(tv, weights_only=True)["__model__"]["kwargs"]["num_heads"] == 12


def test_load_official_checkpoint_refuses_a_model_with_other_heads() -> None:
    ckpt, _ = authors_vit_small()
    for heads, fits in ((6, False), (12, True)):  # timm's ViT-S has 6, the authors' 12
        vit = timm.create_model("vit_small_patch16_224", num_classes=0, num_heads=heads)
        base = nn.Sequential(vit, moco_v3_projector(384, hidden_dim=64, out_dim=32, num_layers=3))
        key_encoder = MomentumEncoder(base)
        predictor = moco_v3_predictor(32, hidden_dim=64)
        if fits:
            load_official_checkpoint(ckpt, base, key_encoder, predictor=predictor)
            pos_embed = vit.get_parameter("pos_embed")  # (create_model says nn.Module)
            assert torch.equal(pos_embed, ckpt["state_dict"]["module.base_encoder.pos_embed"])
        else:
            with pytest.raises(LayoutError, match=r"has 6 attention heads, the checkpoint 12"):
                load_official_checkpoint(ckpt, base, key_encoder, predictor=predictor)


def test_the_examples_vit_small_has_the_papers_12_heads() -> None:
    sys.path.insert(0, str(EXAMPLES))
    from harness import backbone

    vit, dim = backbone("vit_small", 224)
    assert dim == 384
    assert {m.num_heads for m in vit.modules() if isinstance(m, nn.MultiheadAttention)} == {12}
    vit, _ = backbone("vit_small", 224, num_heads=6)  # a checkpoint's record overrides
    assert {m.num_heads for m in vit.modules() if isinstance(m, nn.MultiheadAttention)} == {6}


def tiny_timm_vit(**options: Any) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=8, depth=2, **options
    )


def test_an_unrecorded_head_count_is_refused_or_given() -> None:
    vit = tiny_timm_vit()  # 3 heads
    state = vit.state_dict()
    with pytest.raises(LayoutError, match="number of attention heads is not recorded"):
        backbone_state_dict(state, to="torchvision")
    spec = backbone_spec(state, to="torchvision", num_heads=3)
    assert spec is not None and spec.kwargs["num_heads"] == 3
    assert backbone_spec(vit, to="timm") == ModelSpec(  # a module: heads from its layers
        "timm.create_model",
        ("vit_tiny_patch16_224",),
        {"num_classes": 0, "img_size": 32, "patch_size": 8, "depth": 2, "num_heads": 3},
    )
    with pytest.raises(ValueError, match=r"num_heads=4 contradicts VisionTransformer"):
        backbone_state_dict(vit, num_heads=4)
    with pytest.raises(ValueError, match="must divide the ViT's width 192, got 5"):
        backbone_state_dict(state, num_heads=5)
    with pytest.raises(TypeError, match="num_heads must be an int, got str"):
        backbone_state_dict(state, num_heads="3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_heads must be positive, got 0"):
        backbone_state_dict(state, num_heads=0)
    resnet = torchvision.models.resnet18()
    with pytest.raises(ValueError, match="num_heads applies to ViTs"):
        backbone_state_dict(resnet, num_heads=3)
    ckpt = {"recipe": "moco_v2", "model": state, "key_encoder": {}, "num_heads": 3}
    assert backbone_spec(ckpt, to="torchvision") == backbone_spec(vit, to="torchvision")


@pytest.mark.parametrize(
    "options", [{"global_pool": "avg"}, {"global_pool": "avg", "fc_norm": False}], ids=str
)
def test_a_timm_vit_that_averages_is_refused_for_torchvision_and_kept_for_timm(
    options: dict[str, Any],
) -> None:
    vit = tiny_timm_vit(**options)
    with pytest.raises(LayoutError, match=r"global_pool='avg'.*features would differ"):
        backbone_state_dict(vit, to="torchvision")
    expected: dict[str, Any] = {
        "num_classes": 0,
        "img_size": 32,
        "patch_size": 8,
        "depth": 2,
        "num_heads": 3,
    }
    expected |= {"global_pool": "avg"} | ({"fc_norm": False} if "fc_norm" in options else {})
    spec = backbone_spec(vit, to="timm")
    assert spec == ModelSpec("timm.create_model", ("vit_tiny_patch16_224",), expected)
    rebuilt = spec.build()
    rebuilt.load_state_dict(backbone_state_dict(vit, to="timm"))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(features(rebuilt, x), features(vit, x), rtol=0, atol=1e-10)
    if "fc_norm" not in options:  # a state dict with fc_norm.*: refused by its tensors too
        with pytest.raises(LayoutError, match="global_pool='avg', with fc_norm"):
            backbone_state_dict(vit.state_dict(), to="torchvision", num_heads=3)


def test_a_resnet_needs_no_model_statement() -> None:
    assert backbone_spec(torchvision.models.resnet18()) is None  # its weights say everything
