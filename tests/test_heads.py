"""Heads: structure and parameter counts of the reference heads; strip_classifier."""

from __future__ import annotations

import inspect
from typing import cast

import pytest
import timm
import torch
import torchvision
from torch import nn

import momentum_contrast
from momentum_contrast import (
    build_mlp,
    moco_v1_head,
    moco_v2_head,
    moco_v3_predictor,
    moco_v3_projector,
    strip_classifier,
)

EMPTY = inspect.Parameter.empty


def layout(module: nn.Module) -> list[tuple[str, ...]]:
    """(type, in, out, bias) for Linear, (type, features, affine) for BatchNorm1d."""
    out: list[tuple[str, ...]] = []
    for m in module.modules():
        if isinstance(m, nn.Linear):
            out.append(("Linear", str(m.in_features), str(m.out_features), str(m.bias is not None)))
        elif isinstance(m, nn.BatchNorm1d):
            out.append(("BN", str(m.num_features), str(m.affine)))
        elif isinstance(m, nn.ReLU):
            out.append(("ReLU",))
    return out


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_v1_head() -> None:
    head = moco_v1_head(2048)
    assert layout(head) == [("Linear", "2048", "128", "True")]
    assert n_params(head) == 2048 * 128 + 128


def test_v2_head() -> None:
    head = moco_v2_head(2048)
    assert layout(head) == [
        ("Linear", "2048", "2048", "True"),
        ("ReLU",),
        ("Linear", "2048", "128", "True"),
    ]
    assert n_params(head) == (2048 * 2048 + 2048) + (2048 * 128 + 128)


def test_v2_head_hidden_width_is_the_feature_width_as_the_reference() -> None:
    """The reference widens the backbone's fc: Linear(dim_mlp, dim_mlp) with dim_mlp = fc's
    input width, so a ResNet-18 gets 512 -> 512 -> 128, not 512 -> 2048 -> 128."""
    assert layout(moco_v2_head(512)) == [
        ("Linear", "512", "512", "True"),
        ("ReLU",),
        ("Linear", "512", "128", "True"),
    ]
    assert layout(moco_v2_head(512, hidden_dim=1024, out_dim=64)) == [
        ("Linear", "512", "1024", "True"),
        ("ReLU",),
        ("Linear", "1024", "64", "True"),
    ]
    with pytest.raises(ValueError, match="hidden_dim"):
        moco_v2_head(512, hidden_dim=0)


def test_v3_resnet_projector_and_predictor() -> None:
    projector = moco_v3_projector(2048)
    assert layout(projector) == [
        ("Linear", "2048", "4096", "False"),
        ("BN", "4096", "True"),
        ("ReLU",),
        ("Linear", "4096", "256", "False"),
        ("BN", "256", "False"),
    ]
    assert n_params(projector) == 2048 * 4096 + 2 * 4096 + 4096 * 256
    predictor = moco_v3_predictor()
    assert layout(predictor) == [
        ("Linear", "256", "4096", "False"),
        ("BN", "4096", "True"),
        ("ReLU",),
        ("Linear", "4096", "256", "False"),
    ]
    assert n_params(predictor) == 256 * 4096 + 2 * 4096 + 4096 * 256


def test_v3_vit_projector_and_predictor() -> None:
    projector = moco_v3_projector(768, num_layers=3)
    assert layout(projector) == [
        ("Linear", "768", "4096", "False"),
        ("BN", "4096", "True"),
        ("ReLU",),
        ("Linear", "4096", "4096", "False"),
        ("BN", "4096", "True"),
        ("ReLU",),
        ("Linear", "4096", "256", "False"),
        ("BN", "256", "False"),
    ]
    predictor = moco_v3_predictor(last_bn=True)
    assert layout(predictor)[-1] == ("BN", "256", "False")
    assert n_params(predictor) == 256 * 4096 + 2 * 4096 + 4096 * 256


def test_build_mlp_single_layer_and_forward() -> None:
    mlp = build_mlp(5, hidden_dim=99, out_dim=3, num_layers=1, last_bn=False)
    assert layout(mlp) == [("Linear", "5", "3", "False")]
    mlp = build_mlp(5, hidden_dim=7, out_dim=3, num_layers=3)
    assert [type(m).__name__ for m in mlp] == [
        *["Linear", "BatchNorm1d", "ReLU"] * 2,
        "Linear",
        "BatchNorm1d",
    ]
    out = mlp(torch.randn(10, 5))
    assert out.shape == (10, 3)
    # the last BatchNorm has no scale and shift at all (an affine one at initialisation
    # would also standardise the output, so look at the module itself)
    last, hidden = mlp[-1], mlp[1]
    assert isinstance(last, nn.BatchNorm1d) and isinstance(hidden, nn.BatchNorm1d)
    assert last.affine is False and last.weight is None and last.bias is None
    assert [name for name, _ in last.named_parameters()] == []
    assert hidden.affine is True and hidden.weight is not None
    torch.testing.assert_close(out.mean(0), torch.zeros(3), atol=1e-5, rtol=0)


HEAD_SIGNATURES = {
    # name: (positional names, keyword-only names with their defaults), from DESIGN.md
    "build_mlp": (
        ["in_dim"],
        {"hidden_dim": EMPTY, "out_dim": EMPTY, "num_layers": EMPTY, "last_bn": True},
    ),
    "moco_v1_head": (["in_dim"], {"out_dim": 128}),
    "moco_v2_head": (["in_dim"], {"hidden_dim": None, "out_dim": 128}),
    "moco_v3_projector": (["in_dim"], {"hidden_dim": 4096, "out_dim": 256, "num_layers": 2}),
    "moco_v3_predictor": (["in_dim"], {"hidden_dim": 4096, "last_bn": False}),
}


@pytest.mark.parametrize("name", sorted(HEAD_SIGNATURES))
def test_head_builders_take_in_dim_positionally_and_the_rest_by_keyword(name: str) -> None:
    params = inspect.signature(getattr(momentum_contrast, name)).parameters.values()
    positional = [p.name for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    keyword = {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert (positional, keyword) == HEAD_SIGNATURES[name]


def test_a_second_positional_number_is_refused_not_misread() -> None:
    """``moco_v2_head(2048, 128)`` used to build 2048 -> 128 -> 128 (128 read as hidden_dim)."""
    calls = [
        lambda: moco_v2_head(2048, 128),  # type: ignore[call-arg]
        lambda: moco_v1_head(2048, 64),  # type: ignore[call-arg]
        lambda: moco_v3_projector(2048, 4096),  # type: ignore[call-arg]
        lambda: moco_v3_predictor(256, 4096),  # type: ignore[call-arg]
        lambda: build_mlp(2, 2048, 4096, 256),  # type: ignore[call-arg]
    ]
    for call in calls:
        with pytest.raises(TypeError, match="positional argument"):
            call()
    assert layout(moco_v2_head(2048, out_dim=128)) == [
        ("Linear", "2048", "2048", "True"),
        ("ReLU",),
        ("Linear", "2048", "128", "True"),
    ]
    assert layout(moco_v3_predictor(in_dim=32, hidden_dim=8)) == [
        ("Linear", "32", "8", "False"),
        ("BN", "8", "True"),
        ("ReLU",),
        ("Linear", "8", "32", "False"),
    ]


def test_strip_torchvision_resnet50() -> None:
    model, dim = strip_classifier(torchvision.models.resnet50())
    assert dim == 2048 and isinstance(model.fc, nn.Identity)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 2048)


def test_strip_torchvision_vit_b_16() -> None:
    model, dim = strip_classifier(torchvision.models.vit_b_16())
    assert dim == 768
    assert model(torch.randn(1, 3, 224, 224)).shape == (1, 768)


def test_strip_custom_head_and_sequential_classifier() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(12, 20), nn.ReLU())
            self.head = nn.Linear(20, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.body(x))

    model, dim = strip_classifier(Net())
    assert dim == 20 and model(torch.randn(3, 3, 2, 2)).shape == (3, 20)

    seq = nn.Sequential()
    seq.add_module("features", nn.Flatten())
    seq.add_module("classifier", nn.Sequential(nn.Dropout(0.2), nn.Linear(12, 7)))
    model, dim = strip_classifier(seq)
    assert dim == 12 and model(torch.randn(2, 3, 2, 2)).shape == (2, 12)


@pytest.mark.parametrize(("name", "dim"), [("resnet18", 512), ("vit_tiny_patch16_224", 192)])
def test_strip_timm_models(name: str, dim: int) -> None:
    model, got = strip_classifier(timm.create_model(name, pretrained=False))
    assert got == dim
    assert model(torch.randn(1, 3, 224, 224)).shape == (1, dim)


@pytest.mark.parametrize(
    ("name", "dim"),
    [
        ("mobilenetv3_small_050", 1024),  # num_features 288
        ("ghostnet_050", 1280),  # 480
        ("mobilenetv4_conv_small", 1280),  # 960
        ("efficientvit_b0", 1280),  # 128
        ("hgnetv2_b0", 2048),  # 1024
        ("repghostnet_050", 1280),  # 480
    ],
)
def test_strip_timm_models_with_a_pre_logits_head_gives_its_width(name: str, dim: int) -> None:
    # A pre-logits layer (conv_head, ...) between the pooling and the classifier stays after
    # reset_classifier(0): the features are head_hidden_size wide, not num_features
    model, got = strip_classifier(timm.create_model(name, pretrained=False).eval())
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert got == out.shape[1] == dim and out.shape == (2, dim)


def test_strip_a_compiled_model_strips_the_model_it_compiles() -> None:
    """``torch.compile`` of a torchvision model is stripped as the model (it was refused,
    while a compiled timm model was stripped): the compiled wrapper is returned."""
    inner = torchvision.models.resnet18(num_classes=10)
    compiled = cast(nn.Module, torch.compile(inner, backend="eager"))
    stripped, dim = strip_classifier(compiled)
    assert stripped is compiled and dim == 512 and isinstance(inner.fc, nn.Identity)
    assert stripped(torch.randn(2, 3, 32, 32)).shape == (2, 512)
    timm_inner = timm.create_model("mobilenetv3_small_050", pretrained=False)
    timm_compiled = cast(nn.Module, torch.compile(timm_inner, backend="eager"))
    assert strip_classifier(timm_compiled) == (timm_compiled, 1024)  # head_hidden_size


def test_strip_unknown_model_says_what_to_do() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    with pytest.raises(TypeError, match="Build the feature extractor yourself"):
        strip_classifier(model)
    mid = nn.Module()
    mid.fc = nn.Linear(3, 3)
    mid.after = nn.ReLU()  # fc is not the last layer
    with pytest.raises(TypeError, match="last children: fc: Linear, after: ReLU"):
        strip_classifier(mid)


@pytest.mark.parametrize(
    ("build", "dim"),
    [("mobilenet_v3_small", 1024), ("mobilenet_v2", 1280), ("googlenet", 1024), ("alexnet", 4096)],
)
def test_strip_removes_the_classifiers_dropout(build: str, dim: int) -> None:
    """The dropout in front of the classifier zeroed about 20% of the features at random,
    in the key encoder too (it runs in training mode): the same images gave other keys."""
    kwargs = {"init_weights": True, "aux_logits": False} if build == "googlenet" else {}
    model, width = strip_classifier(getattr(torchvision.models, build)(**kwargs))
    x = torch.rand(2, 3, 64, 64)
    model.train()
    first, second = model(x), model(x)
    assert width == dim and first.shape == (2, dim) and torch.equal(first, second)
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())


def test_strip_removes_a_classifiers_dropout_and_of_the_models_own_those_before_it() -> None:
    """VGG's and AlexNet's classifier hold two dropouts, one between its Linear layers: both
    go. Of a model's own children (GoogLeNet's layout), only the dropout registered right
    before the classifier goes: another one may run anywhere in its forward."""
    vgg_like = nn.Sequential()
    vgg_like.add_module("features", nn.Flatten())
    layers = [nn.Linear(12, 8), nn.Dropout(0.5), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3)]
    vgg_like.add_module("classifier", nn.Sequential(*layers))
    model, dim = strip_classifier(vgg_like)
    kinds = [type(m).__name__ for m in model.get_submodule("classifier").children()]
    assert dim == 8 and kinds == ["Linear", "Identity", "ReLU", "Identity", "Identity"]

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.input_dropout = nn.Dropout(0.1)
            self.body = nn.Linear(6, 4)
            self.dropout = nn.Dropout(0.2)
            self.fc = nn.Linear(4, 2)

    model, dim = strip_classifier(Net())
    kinds = [type(m).__name__ for m in model.children()]
    assert dim == 4 and kinds == ["Dropout", "Linear", "Identity", "Identity"]


@pytest.mark.parametrize(
    ("build", "side", "dim"), [("googlenet", 64, 1024), ("inception_v3", 80, 2048)]
)
def test_strip_torchvision_auxiliary_classifiers(build: str, side: int, dim: int) -> None:
    """In training mode these returned (logits, aux logits) named tuples: a head on top failed,
    and the auxiliary classifiers' parameters stayed trainable."""
    model, width = strip_classifier(getattr(torchvision.models, build)(init_weights=True))
    assert width == dim and not any("aux" in n.lower() for n, _ in model.named_parameters())
    out = nn.Sequential(model, moco_v2_head(width)).train()(torch.randn(2, 3, side, side))
    assert out.shape == (2, 128) and torch.isfinite(out).all()


@pytest.mark.parametrize(
    "name",
    ["resnet18", "vit_tiny_patch16_224", "convnext_atto", "hiera_tiny_224", "mambaout_femto"],
)
def test_strip_timm_models_without_pooling_are_refused(name: str) -> None:
    """global_pool="": (N, C, H, W) or (N, T, C) features under a promised (N, C). Hiera's
    and MambaOut's heads keep it as a ``pool_type`` string: they were taken."""
    with pytest.raises(TypeError, match=r'built with global_pool="": it gives a feature map'):
        strip_classifier(timm.create_model(name, global_pool=""))
    assert strip_classifier(timm.create_model(name))[1] > 0  # pooled by default
