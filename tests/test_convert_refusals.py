"""momentum_contrast.convert refuses, or says, what a load would otherwise take silently:
a ResNet layer or block lost, a stem detectron2 cannot hold, a ViT grid or representation
layer the conversion would get wrong; and the authors' loader checks its pieces first."""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from typing import Any, cast

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from momentum_contrast import KeyQueue, MomentumEncoder, moco_v2_head, strip_classifier
from momentum_contrast.convert import (
    LayoutError,
    backbone_spec,
    backbone_state_dict,
    checkpoint_kind,
    load_official_checkpoint,
    main,
)


def resnet18_state(*, drop: str = "", cifar_stem: bool = False) -> dict[str, torch.Tensor]:
    net = torchvision.models.resnet18()
    if cifar_stem:  # the example scripts' CIFAR stem: 3x3, stride 1, no max-pool
        net.conv1, net.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    state = strip_classifier(net)[0].state_dict()
    return {k: v for k, v in state.items() if not (drop and k.startswith(drop))}


@pytest.mark.parametrize("to", ["torchvision", "timm", "detectron2"])
def test_a_lost_resnet_layer_is_refused_for_every_target(to: str) -> None:
    with pytest.raises(
        LayoutError, match="a ResNet has layer1 to layer4, this one layer1, layer2, layer3"
    ):
        backbone_state_dict({"state_dict": resnet18_state(drop="layer4.")}, to=to)  # type: ignore[arg-type]


def test_a_live_module_without_a_layer_lost_nothing_and_converts() -> None:
    net = torchvision.models.resnet18()
    net.layer4, net.fc = nn.Identity(), nn.Identity()  # cut on purpose: a module holds it all
    features = net
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for to in ("torchvision", "timm"):
            state = backbone_state_dict(features, to=to)  # type: ignore[arg-type]
            assert (
                not any(k.startswith("layer4.") for k in state) and "layer3.1.bn2.weight" in state
            )
    with pytest.raises(LayoutError, match=re.escape("(2, 2, 2, 0) blocks per layer")):
        backbone_state_dict(features, to="detectron2")  # which builds no such ResNet


def test_a_lost_last_block_is_refused_for_detectron2_and_warned_for_torchvision() -> None:
    ckpt = {"state_dict": resnet18_state(drop="layer3.1.")}  # (2, 2, 1, 2) blocks
    with pytest.raises(
        LayoutError, match=re.escape("(2, 2, 1, 2) blocks per layer, which no detectron2")
    ):
        backbone_state_dict(ckpt, to="detectron2")
    with pytest.warns(
        UserWarning, match=re.escape("(2, 2, 1, 2) blocks per layer, which no torchvision")
    ):
        state = backbone_state_dict(ckpt, to="torchvision")
    assert "layer3.1.conv1.weight" not in state
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a whole ResNet-18 warns of nothing
        assert len(backbone_state_dict({"state_dict": resnet18_state()})) == len(state) + 12


def test_a_cifar_stem_is_refused_for_detectron2_and_noted_by_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "cifar.pt"
    torch.save({"state_dict": resnet18_state(cifar_stem=True)}, src)
    assert main([str(src), str(tmp_path / "d2.pkl"), "--to", "detectron2"]) == 2
    assert "conv1 is 3x3 (a CIFAR stem?), detectron2's ResNet stem 7x7" in capsys.readouterr().err
    assert not (tmp_path / "d2.pkl").exists()
    assert main([str(src), str(tmp_path / "tv.pth"), "--to", "torchvision"]) == 0
    out = capsys.readouterr().out
    assert "note: conv1 is 3x3, not torchvision's and timm's 7x7" in out
    model = torchvision.models.resnet18()  # the same stem, as the note says
    model.conv1, model.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    converted = torch.load(tmp_path / "tv.pth", weights_only=True)
    missing = model.load_state_dict(converted, strict=False).missing_keys
    assert missing == ["fc.weight", "fc.bias"]
    assert main([str(src), str(tmp_path / "std.pth"), "--to", "torchvision"]) == 0
    torch.save({"state_dict": resnet18_state()}, src)
    assert main([str(src), str(tmp_path / "std2.pth"), "--to", "torchvision"]) == 0
    assert "note:" not in capsys.readouterr().out.split("std2.pth")[-1]


def test_the_command_line_prints_a_warning_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "lost_block.pt"
    torch.save({"state_dict": resnet18_state(drop="layer3.1.")}, src)
    assert main([str(src), str(tmp_path / "tv.pth"), "--to", "torchvision"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: ") and "(2, 2, 1, 2)" in err[0]


def test_a_non_square_timm_vit_converts_from_the_module() -> None:
    # 2 x 4 patches and a class token: 9 position rows, as a 3 x 3 grid without one
    vit = timm.create_model(
        "vit_tiny_patch16_224", img_size=(16, 32), patch_size=8, embed_dim=64, depth=2,
        num_heads=4, num_classes=0,
    ).eval()  # fmt: skip
    spec = backbone_spec(vit, to="timm")
    assert spec is not None and spec.kwargs["img_size"] == (16, 32)
    assert "no_embed_class" not in spec.kwargs
    built = spec.build().eval()
    built.load_state_dict(backbone_state_dict(vit, to="timm"))
    x = torch.randn(2, 3, 16, 32)
    torch.testing.assert_close(built(x), vit(x), rtol=0, atol=0)
    with pytest.raises(LayoutError, match="takes square images"):
        backbone_spec(vit, to="torchvision")


def test_a_torchvision_vit_with_a_representation_layer_is_refused() -> None:
    vit = torchvision.models.VisionTransformer(16, 8, 1, 2, 32, 64, representation_size=24)
    features, dim = strip_classifier(vit)
    assert dim == 24  # its features are the representation layer's output
    with pytest.raises(LayoutError, match=r"representation layer \(heads.pre_logits"):
        backbone_state_dict(nn.Sequential(features, nn.Linear(dim, 8)))


def test_a_timm_vit_without_its_final_norm_is_refused_for_torchvision_too() -> None:
    vit = timm.create_model(
        "vit_tiny_patch16_224", img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2,
        num_classes=0,
    )  # fmt: skip
    state = {k: v for k, v in vit.state_dict().items() if not k.startswith("norm.")}
    for to in ("torchvision", "timm"):
        with pytest.raises(LayoutError, match="a ViT without a final norm"):
            backbone_state_dict({"state_dict": state, "num_heads": 2}, to=to)  # type: ignore[arg-type]


def tiny_vit_state() -> dict[str, torch.Tensor]:
    vit = timm.create_model(
        "vit_tiny_patch16_224", img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2,
        num_classes=0,
    )  # fmt: skip
    return vit.state_dict()


@pytest.mark.parametrize(
    ("change", "refusal"),
    [
        ("rectangular patches", r"the patches are not square \(8x4 pixels\)"),
        ("no position embedding", "a ViT without a learned or fixed position embedding"),
        ("six patch positions", "6 patch positions are not a square grid"),
        ("one input channel", "torchvision's VisionTransformer takes 3 input channels"),
    ],
)
def test_a_vit_file_that_no_model_can_take_is_refused(change: str, refusal: str) -> None:
    """Refusals of the weights' layout, each naming what is wrong (a ViT of 2 x 2 patches
    of 8 pixels, with a class token: 5 position rows)."""
    state = tiny_vit_state()
    if change == "rectangular patches":
        state["patch_embed.proj.weight"] = state["patch_embed.proj.weight"][..., :4]
    elif change == "no position embedding":
        del state["pos_embed"]
    elif change == "six patch positions":
        state["pos_embed"] = torch.zeros(1, 7, 32)
    else:
        state["patch_embed.proj.weight"] = state["patch_embed.proj.weight"][:, :1]
    with pytest.raises(LayoutError, match=refusal):
        backbone_spec({"state_dict": state, "num_heads": 2}, to="torchvision")  # type: ignore[arg-type]
    if change == "one input channel":  # timm builds it (in_chans=1)
        spec = backbone_spec({"state_dict": state, "num_heads": 2}, to="timm")  # type: ignore[arg-type]
        assert spec is not None and spec.kwargs["in_chans"] == 1


def test_a_module_whose_attention_layers_disagree_on_heads_is_refused() -> None:
    vit = timm.create_model(
        "vit_tiny_patch16_224", img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2,
        num_classes=0,
    )  # fmt: skip
    vit.blocks[1].attn.num_heads = 4
    with pytest.raises(LayoutError, match=r"different head counts \[2, 4\]"):
        backbone_spec(vit, to="timm")


def v2_resnet18() -> nn.Module:
    return nn.Sequential(strip_classifier(torchvision.models.resnet18())[0], moco_v2_head(512))


def authors_v2(queue_ptr: int, size: int = 16) -> dict[str, object]:
    """An authors' v1/v2 checkpoint of a ResNet-18 (backbone at the top, MLP head at fc)."""

    def names(prefix: str, model: nn.Module) -> dict[str, torch.Tensor]:
        return {
            prefix + (k[2:] if k.startswith("0.") else "fc." + k[2:]): v + 1
            for k, v in model.state_dict().items()
        }

    state = {
        **names("module.encoder_q.", v2_resnet18()),
        **names("module.encoder_k.", v2_resnet18()),
    }
    state["module.queue"] = F.normalize(torch.randn(128, size), dim=0)
    state["module.queue_ptr"] = torch.tensor([queue_ptr])
    return {"epoch": 200, "arch": "resnet18", "state_dict": state}


def test_the_authors_loader_changes_nothing_when_the_queue_pointer_is_out_of_range() -> None:
    model = v2_resnet18()
    key_encoder, queue = MomentumEncoder(model), KeyQueue(16, 128)
    pieces = (model, key_encoder, queue)
    before = [t.clone() for piece in pieces for t in piece.state_dict().values()]
    with pytest.raises(  # the cause, not torch's first line ("Error(s) in loading ...")
        LayoutError, match=r"the checkpoint's queue does not fit: KeyQueue: ptr 16, not an int"
    ):
        load_official_checkpoint(authors_v2(queue_ptr=16), model, key_encoder, queue=queue)
    after = [t for piece in pieces for t in piece.state_dict().values()]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_the_authors_loader_refuses_a_pointer_of_another_shape_or_dtype() -> None:
    """Two pointers were torch's bare reshape error; a NaN one a bare ValueError."""
    for ptr, said in (
        (torch.tensor([0, 1]), "does not fit this model: other shapes ['ptr: (2,) in the"),
        (torch.tensor([0.5]), "does not fit: KeyQueue: ptr 0.5, not an int in [0, 15]"),
        (torch.tensor([float("nan")]), "does not fit: KeyQueue: ptr nan, not an int in [0, 15]"),
    ):
        ckpt, model = authors_v2(queue_ptr=0), v2_resnet18()
        cast(dict[str, Any], ckpt["state_dict"])["module.queue_ptr"] = ptr
        key_encoder, queue = MomentumEncoder(model), KeyQueue(16, 128)
        with pytest.raises(LayoutError, match=f"the checkpoint's queue {re.escape(said)}"):
            load_official_checkpoint(ckpt, model, key_encoder, queue=queue)
        assert int(queue.ptr) == 0


def test_the_authors_loader_names_a_bad_piece() -> None:
    ckpt, model = authors_v2(queue_ptr=0), v2_resnet18()
    key_encoder, queue = MomentumEncoder(model), KeyQueue(16, 128)
    cases: list[tuple[dict[str, Any], type[Exception], str]] = [
        ({"model": None}, TypeError, "model must be an nn.Module, got NoneType"),
        ({"key_encoder": v2_resnet18()}, TypeError, "a MomentumEncoder of model, got Sequential"),
        ({"queue": torch.zeros(16, 128)}, TypeError, "queue must be a KeyQueue or None, got"),
        ({"key_encoder": MomentumEncoder(v2_resnet18())}, ValueError, "another Sequential"),
        ({"source": 123}, TypeError, "source must be a path (str or os.PathLike) or a loaded"),
    ]
    for kwargs, error, message in cases:
        pieces: dict[str, Any] = {
            "source": ckpt,
            "model": model,
            "key_encoder": key_encoder,
            "queue": queue,
        }
        with pytest.raises(error, match=re.escape(message)):
            load_official_checkpoint(**(pieces | kwargs))
    with pytest.raises(TypeError, match="checkpoint must be a path"):
        checkpoint_kind(None)  # type: ignore[arg-type]


def test_the_authors_loader_takes_a_compiled_backbone() -> None:
    ckpt = authors_v2(queue_ptr=3)
    backbone = cast(nn.Module, torch.compile(strip_classifier(torchvision.models.resnet18())[0]))
    model = nn.Sequential(backbone, moco_v2_head(512))
    key_encoder, queue = MomentumEncoder(model), KeyQueue(16, 128)
    load_official_checkpoint(ckpt, model, key_encoder, queue=queue)
    state = ckpt["state_dict"]
    assert isinstance(state, dict)
    query, key = model.state_dict(), key_encoder.key_encoder.state_dict()
    assert torch.equal(query["0._orig_mod.conv1.weight"], state["module.encoder_q.conv1.weight"])
    assert torch.equal(query["1.0.weight"], state["module.encoder_q.fc.0.weight"])
    assert torch.equal(
        key["0._orig_mod.layer4.1.bn2.running_var"],
        state["module.encoder_k.layer4.1.bn2.running_var"],
    )


def test_a_plain_pickle_as_source_gets_one_line_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "model_final.pkl"  # as detectron2's files: a plain pickle of arrays
    with open(src, "wb") as f:
        pickle.dump({"model": {"stem.conv1.weight": [0.0]}, "__author__": "x"}, f, protocol=4)
    assert main([str(src), str(tmp_path / "out.pth"), "--to", "torchvision"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a plain pickle, as detectron2's .pkl" in err[0]
