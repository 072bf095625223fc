"""What a conversion refuses, keeps out or reads back: a lost tensor is named, never made
up; a tensor beside the backbone never becomes part of it; metadata beside a bare state
dict is metadata; a converted file's own record decides how its ViT pools."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from torch import nn

from momentum_contrast.convert import (
    LayoutError,
    ModelSpec,
    backbone_spec,
    backbone_state_dict,
    main,
)


def vit_spec(source: object, **kwargs: object) -> ModelSpec:
    spec = backbone_spec(source, to="timm", **kwargs)  # type: ignore[arg-type]
    assert spec is not None  # a ViT's
    return spec


def small_vit(**kwargs: object) -> nn.Module:
    torch.manual_seed(0)
    kwargs = {"img_size": 32, "patch_size": 8, "depth": 3, "num_heads": 3, **kwargs}
    return timm.create_model("vit_tiny_patch16_224", num_classes=0, **kwargs).double().eval()


@pytest.mark.parametrize("to", ["torchvision", "timm"])
def test_a_lost_vit_tensor_is_named_not_filled_in(to: str, tmp_path: Path) -> None:
    """A missing qkv bias became zeros for torchvision (wrong features, strict load fine);
    a missing fc1 weight was a KeyError traceback from the command line; block 0's qkv bias
    lost alone gave a timm spec with qkv_bias=False, which the other blocks' biases did not
    load into (exit status 0)."""
    lost_ones = ("blocks.0.attn.qkv.bias", "blocks.1.attn.qkv.bias", "blocks.0.mlp.fc1.weight")
    for lost in (*lost_ones, "blocks.2.norm2.bias"):
        state = dict(small_vit().state_dict())
        del state[lost]
        for convert in (backbone_state_dict, backbone_spec):
            with pytest.raises(LayoutError, match=rf"tensor '{lost}' is missing"):
                convert({"model": state, "num_heads": 3}, to=to)  # type: ignore[arg-type]
        torch.save({"model": state, "num_heads": 3}, src := tmp_path / "lost.pt")
        assert main([str(src), str(tmp_path / f"{to}.pth"), "--to", to]) == 2
    without = small_vit(qkv_bias=False)  # no qkv bias anywhere: zeros compute the same
    converted = backbone_state_dict({"model": without.state_dict(), "num_heads": 3})
    assert not converted["encoder.layers.encoder_layer_0.self_attention.in_proj_bias"].any()


@pytest.mark.parametrize(
    "arch", ["resnet18", "resnet50", "resnet18_groupnorm", "timm_resnet50_avg_down"]
)
def test_a_lost_resnet_tensor_is_named_for_every_target(arch: str, tmp_path: Path) -> None:
    """A ResNet missing a tensor converted with exit status 0: detectron2 and a non-strict
    load then started that tensor from random weights."""
    if arch == "resnet18_groupnorm":
        model = torchvision.models.resnet18(norm_layer=lambda c: nn.GroupNorm(1, c))
    elif arch == "timm_resnet50_avg_down":
        model = timm.create_model("resnet50", avg_down=True)
    else:
        model = getattr(torchvision.models, arch)()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    assert backbone_state_dict(state).keys() == state.keys()  # whole: converts
    anchors = ("conv1.weight", "bn1.weight", "layer1.0.conv1.weight")  # else: no ResNet found
    lost_ones = [k for k in list(state)[::7] if k not in anchors]
    for lost in [*lost_ones, next(k for k in state if "layer2.0.downsample" in k)]:
        cut = {k: v for k, v in state.items() if k != lost}
        for to in ("torchvision", "timm", "detectron2"):
            if to == "detectron2" and arch == "timm_resnet50_avg_down":
                continue  # refused anyway: detectron2 has no average-pool shortcut
            with pytest.raises(LayoutError, match=rf"tensor '{re.escape(lost)}' is missing"):
                backbone_state_dict({"state_dict": cut}, to=to)  # type: ignore[arg-type]
    torch.save({"state_dict": cut}, src := tmp_path / "cut.pth")
    assert main([str(src), str(tmp_path / "out.pkl"), "--to", "detectron2"]) == 2
    assert not (tmp_path / "out.pkl").exists()


@pytest.mark.parametrize(("pool", "fc_norm"), [("avg", False), ("token", True)])
def test_a_converted_file_keeps_its_pooling_when_converted_again(
    pool: str, fc_norm: bool, tmp_path: Path
) -> None:
    """The pooling was guessed from fc_norm's tensors, not read from the file's record."""
    vit = small_vit(global_pool=pool, fc_norm=fc_norm)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    record = vit_spec(vit).as_record()  # a live module: its pooling is known
    first, again = tmp_path / "first.pth", tmp_path / "again.pth"
    torch.save({**backbone_state_dict(vit, to="timm"), "__model__": record}, first)
    assert main([str(first), str(again), "--to", "timm"]) == 0
    spec = vit_spec(again)
    assert spec == vit_spec(vit)
    model = spec.build().double().eval()
    model.load_state_dict(
        {k: v for k, v in torch.load(again, weights_only=True).items() if k != "__model__"}
    )  # strict
    with torch.no_grad():
        torch.testing.assert_close(model(x), vit(x), rtol=0, atol=1e-12)


def test_metadata_beside_a_bare_state_dict_is_metadata() -> None:
    """The checkpointing guide says to store num_heads beside the tensors: that was refused
    ("checkpoint['num_heads'] is a int, not a tensor"), as were epoch and arch."""
    spec = vit_spec({**small_vit().state_dict(), "num_heads": 3, "epoch": 7})
    assert spec.kwargs["num_heads"] == 3
    resnet = torchvision.models.resnet18().state_dict()
    backbone = backbone_state_dict({**resnet, "arch": "resnet18"})
    assert backbone.keys() == {k for k in resnet if not k.startswith("fc.")}
    # dicts beside it (the run's flags, an optimizer's state after a step, tensors included)
    # too; they stopped the conversion ("checkpoint['args.lr'] is a float, not a tensor")
    net = torchvision.models.resnet18()
    sgd = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(2, 3, 32, 32)).sum().backward()
    sgd.step()  # momentum buffers: tensors under "optimizer.state."
    for extra in ({"args": {"lr": 0.1}}, {"optimizer": sgd.state_dict()}):
        for to in ("torchvision", "detectron2"):  # detectron2 refuses tensors a ResNet lacks
            assert len(backbone_state_dict({**resnet, **extra}, to=to)) == len(backbone)
    # a value that is no tensor where a backbone's tensor goes is still refused
    for name in ("layer1.0.conv1.note", "layer4.1.conv2.weight"):
        with pytest.raises(LayoutError, match=rf"\['{name}'\] is a str, not a tensor"):
            backbone_state_dict({**resnet, name: "x"})


def test_tensors_beside_a_bare_backbone_stay_out() -> None:
    """A queue or a predictor beside a bare ResNet became detectron2's stem.queue; a key
    encoder nested under the query's root was written into the query's backbone."""
    resnet = {k: v for k, v in torchvision.models.resnet18().state_dict().items()}
    with pytest.raises(LayoutError, match="tensor 'queue' is not part of a ResNet"):
        backbone_state_dict({**resnet, "queue": torch.randn(16, 8)}, to="detectron2")
    nested = {**resnet, **{f"key_encoder.{k}": v + 1 for k, v in resnet.items()}}
    query = backbone_state_dict(nested)
    assert query.keys() == {k for k in resnet if not k.startswith("fc.")}
    assert all(torch.equal(v, resnet[k]) for k, v in query.items())
    key = backbone_state_dict(nested, encoder="key")
    assert all(torch.equal(v, resnet[k] + 1) for k, v in key.items())
