"""momentum_contrast.convert on the MoCo authors' checkpoint layouts (built from the key
names, shapes and dtypes of the released v2 and v3 ResNet-50 checkpoints in
``shared/fixtures``), the detectron2 names, and every bad input's one-line error."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from momentum_contrast import (
    KeyQueue,
    MomentumEncoder,
    info_nce,
    moco_v2_head,
    moco_v3_predictor,
    moco_v3_projector,
    strip_classifier,
    symmetric_contrastive_loss,
)
from momentum_contrast.convert import (
    LayoutError,
    backbone_state_dict,
    load_official_checkpoint,
    main,
)

# A copy of shared/fixtures/official_checkpoint_keys.json, so that a clean clone has it.
KEYS = json.loads(
    (Path(__file__).parent / "fixtures" / "official_checkpoint_keys.json").read_text()
)


def tensor_like(name: str, shape: list[int], dtype: str, g: torch.Generator) -> torch.Tensor:
    """A plausible value for a tensor of the released checkpoints (finite activations)."""
    if dtype == "int64":
        return torch.zeros(shape, dtype=torch.long)
    if name.endswith("running_var"):
        return torch.rand(shape, generator=g) + 0.5
    if name.endswith("running_mean") or name.endswith(".bias"):
        return 0.01 * torch.randn(shape, generator=g)
    if name.endswith("queue"):
        return F.normalize(torch.randn(shape, generator=g), dim=0)  # (dim, K), unit columns
    if len(shape) == 1:  # BatchNorm weights
        return 1 + 0.01 * torch.randn(shape, generator=g)
    fan_in = max(1, int(torch.tensor(shape[1:]).prod()))
    return torch.randn(shape, generator=g) * (2 / fan_in) ** 0.5


def official(name: str) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    state = {k: tensor_like(k, s, d, g) for k, (s, d) in KEYS[name].items()}
    return {"epoch": 200, "arch": "resnet50", "state_dict": state, "optimizer": {}}


def resnet50_backbone() -> nn.Module:
    return strip_classifier(torchvision.models.resnet50())[0]


def test_official_v2_loads_into_the_pieces_and_trains_one_more_step() -> None:
    ckpt = official("moco_v2_resnet50")
    state = ckpt["state_dict"]
    model = nn.Sequential(resnet50_backbone(), moco_v2_head(2048))
    key_encoder = MomentumEncoder(model)
    queue = KeyQueue(65536, 128)
    info = load_official_checkpoint(ckpt, model, key_encoder, queue=queue)
    assert info == {"kind": "official_v1v2", "epoch": 200, "arch": "resnet50"}
    # (get_parameter and get_buffer: model[0].layer4[2].conv3.weight etc., typed)
    assert torch.equal(
        model.get_parameter("0.layer4.2.conv3.weight"),
        state["module.encoder_q.layer4.2.conv3.weight"],
    )
    assert torch.equal(model.get_parameter("1.2.weight"), state["module.encoder_q.fc.2.weight"])
    key = key_encoder.key_encoder
    assert torch.equal(
        key.get_buffer("0.bn1.running_var"), state["module.encoder_k.bn1.running_var"]
    )
    assert torch.equal(key.get_parameter("1.0.bias"), state["module.encoder_k.fc.0.bias"])
    assert queue.keys.shape == (65536, 128)
    for column in (0, 1, 12345, 65535):  # the authors' column j is our row j
        assert torch.equal(queue.keys[column], state["module.queue"][:, column])
    assert len(queue) == 65536 and int(queue.ptr) == 0

    optimizer = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9)
    x_q, x_k = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    loss = info_nce(model(x_q), k := key_encoder(x_k), queue.negatives(), temperature=0.2)
    loss.backward()
    optimizer.step()
    key_encoder.update()
    queue.push(k)
    assert torch.isfinite(loss) and int(queue.ptr) == 2
    assert not torch.equal(
        key.get_parameter("0.conv1.weight"), state["module.encoder_k.conv1.weight"]
    )


def test_official_v3_loads_into_the_pieces_and_trains_one_more_step() -> None:
    ckpt = official("moco_v3_resnet50")
    state = ckpt["state_dict"]
    base = nn.Sequential(resnet50_backbone(), moco_v3_projector(2048))
    predictor = moco_v3_predictor()
    key_encoder = MomentumEncoder(base)
    info = load_official_checkpoint(ckpt, base, key_encoder, predictor=predictor)
    assert info["kind"] == "official_v3"
    assert torch.equal(
        base.get_buffer("1.4.running_var"), state["module.base_encoder.fc.4.running_var"]
    )
    assert torch.equal(predictor.get_parameter("3.weight"), state["module.predictor.3.weight"])
    assert torch.equal(
        key_encoder.key_encoder.get_parameter("1.0.weight"),
        state["module.momentum_encoder.fc.0.weight"],
    )
    query = nn.Sequential(base, predictor)
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    loss = symmetric_contrastive_loss(query(x1), query(x2), key_encoder(x1), key_encoder(x2))
    loss.backward()
    key_encoder.update(0.99)
    assert torch.isfinite(loss) and base.get_parameter("0.conv1.weight").grad is not None


@pytest.mark.parametrize("name", ["moco_v2_resnet50", "moco_v3_resnet50"])
def test_official_resnet_to_torchvision_and_detectron2(name: str, tmp_path: Path) -> None:
    src = tmp_path / "official.pth.tar"
    torch.save(official(name), src)
    query = "module.encoder_q." if "v2" in name else "module.base_encoder."
    assert main([str(src), str(tmp_path / "tv.pth"), "--to", "torchvision"]) == 0
    tv_state = torch.load(tmp_path / "tv.pth", weights_only=True)
    result = torchvision.models.resnet50().load_state_dict(tv_state, strict=False)
    assert result.missing_keys == ["fc.weight", "fc.bias"] and result.unexpected_keys == []
    assert torch.equal(
        tv_state["layer3.5.bn2.weight"], official(name)["state_dict"][f"{query}layer3.5.bn2.weight"]
    )

    assert main([str(src), str(tmp_path / "d2.pkl"), "--to", "detectron2"]) == 0
    with open(tmp_path / "d2.pkl", "rb") as f:
        d2 = pickle.load(f)
    assert d2["matching_heuristics"] is True and d2["__author__"]
    expected = {authors_detectron2_name(k): k for k in tv_state}
    assert set(d2["model"]) == set(expected)
    for d2_name, tv_name in expected.items():
        assert (d2["model"][d2_name] == tv_state[tv_name].numpy()).all(), d2_name
    assert "stem.conv1.norm.running_mean" in d2["model"]
    assert "res5.2.shortcut.norm.weight" not in d2["model"]
    assert "res5.0.shortcut.norm.weight" in d2["model"] and "res2.0.conv3.norm.bias" in d2["model"]


def authors_detectron2_name(name: str) -> str:
    """The MoCo authors' mapping, from the rules of their conversion script (written here
    independently of the library): stem, resN+1, convK.norm, shortcut(.norm)."""
    parts = name.split(".")
    if not parts[0].startswith("layer"):
        parts = ["stem", *parts]
    out = []
    for p in parts:
        if p.startswith("layer"):
            p = f"res{int(p[5:]) + 1}"
        elif p in ("bn1", "bn2", "bn3"):
            p = f"conv{p[2]}.norm"
        out.append(p)
    joined = ".".join(out)
    return joined.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def official_v3_vit_small() -> tuple[dict[str, Any], nn.Module]:
    """The authors' v3 ViT layout: timm names, ``head`` replaced by the 3-layer projector;
    their ViT-S has 12 attention heads (timm's has 6)."""
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch16_224", num_classes=0, num_heads=12)
    vit.head = moco_v3_projector(384, hidden_dim=64, out_dim=32, num_layers=3)
    state = {f"module.base_encoder.{k}": v for k, v in vit.state_dict().items()}
    state |= {f"module.momentum_encoder.{k}": v.clone() for k, v in vit.state_dict().items()}
    state |= {
        f"module.predictor.{k}": v
        for k, v in moco_v3_predictor(32, hidden_dim=64).state_dict().items()
    }
    vit.head = nn.Identity()
    return {"epoch": 300, "arch": "vit_small", "state_dict": state}, vit


def test_official_v3_vit_converts_for_torchvision_and_timm() -> None:
    ckpt, vit = official_v3_vit_small()
    x = torch.randn(2, 3, 224, 224, dtype=torch.float64)
    expected = vit.double().eval()(x).detach()
    tv = torchvision.models.VisionTransformer(224, 16, 12, 12, 384, 1536)
    result = tv.load_state_dict(backbone_state_dict(ckpt, to="torchvision"), strict=False)
    assert result.missing_keys == ["heads.head.weight", "heads.head.bias"]
    tv.heads = nn.Identity()
    with torch.no_grad():
        torch.testing.assert_close(tv.double().eval()(x), expected, rtol=0, atol=1e-9)
    timm_state = backbone_state_dict(ckpt, encoder="key", to="timm")
    assert set(timm_state) == set(vit.state_dict())


def test_official_v3_vit_loads_into_pieces_with_a_timm_backbone() -> None:
    ckpt, _ = official_v3_vit_small()
    vit = timm.create_model("vit_small_patch16_224", num_classes=0, num_heads=12)
    base = nn.Sequential(vit, moco_v3_projector(384, hidden_dim=64, out_dim=32, num_layers=3))
    predictor = moco_v3_predictor(32, hidden_dim=64)
    key_encoder = MomentumEncoder(base)
    load_official_checkpoint(ckpt, base, key_encoder, predictor=predictor)
    cls_token = vit.get_parameter("cls_token")  # (create_model says nn.Module)
    assert torch.equal(cls_token, ckpt["state_dict"]["module.base_encoder.cls_token"])


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_bad_inputs_get_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "out.pth")
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    assert "is not a PyTorch checkpoint" in run_main([str(text), out, "--to", "timm"], capsys)
    torch.save(moco_v2_head(8), whole := tmp_path / "whole.pt")  # torch.save(model): a pickle
    pickled = run_main([str(whole), out, "--to", "timm"], capsys)  # was torch's cut-off advice
    assert "it pickles a torch.nn.modules.container.Sequential object" in pickled
    assert "pass its state_dict()" in pickled and "\x1b" not in pickled
    missing = str(tmp_path / "missing.pt")
    assert "no such checkpoint file" in run_main([missing, out, "--to", "timm"], capsys)
    torch.save(moco_v2_head(512).state_dict(), head := tmp_path / "head.pt")
    no_backbone = run_main([str(head), out, "--to", "torchvision"], capsys)
    assert "holds no backbone" in no_backbone and "only ResNets and ViTs convert" in no_backbone
    torch.save({"epoch": 3, "notes": "x"}, odd := tmp_path / "odd.pt")
    assert "unknown checkpoint layout" in run_main([str(odd), out, "--to", "timm"], capsys)
    with open(unsafe := tmp_path / "unsafe.pt", "wb") as f:
        pickle.dump({"model": nn.Linear(2, 2)}, f)  # only weights_only=True loading is used
    assert "weights_only=True" in run_main([str(unsafe), out, "--to", "timm"], capsys)
    ckpt, _ = official_v3_vit_small()
    torch.save(ckpt, vit := tmp_path / "vit.pth")
    assert "takes ResNets only" in run_main([str(vit), out, "--to", "detectron2"], capsys)
    resnet = strip_classifier(torchvision.models.resnet18())[0]
    torch.save(resnet.state_dict(), plain := tmp_path / "plain.pt")
    assert "no key encoder" in run_main(
        [str(plain), out, "--to", "timm", "--encoder", "key"], capsys
    )


def test_an_official_checkpoint_of_another_architecture_is_refused() -> None:
    model = nn.Sequential(strip_classifier(torchvision.models.resnet18())[0], moco_v2_head(512))
    with pytest.raises(
        LayoutError, match=r"resnet50's query encoder does not fit this model: unexpected"
    ):
        load_official_checkpoint(
            official("moco_v2_resnet50"), model, MomentumEncoder(model), queue=KeyQueue(65536, 128)
        )
    with pytest.raises(LayoutError, match="not a MoCo authors' checkpoint"):
        load_official_checkpoint({"recipe": "moco_v2", "model": {}}, model, MomentumEncoder(model))


def test_a_piece_that_does_not_fit_leaves_every_piece_as_it_was() -> None:
    """A queue of another size was refused after both encoders had been overwritten."""
    model = nn.Sequential(resnet50_backbone(), moco_v2_head(2048))
    key_encoder, queue = MomentumEncoder(model), KeyQueue(4096, 128)  # the checkpoint's K: 65,536
    before = [t.clone() for t in (*model.state_dict().values(), queue.keys)]
    with pytest.raises(
        LayoutError,
        match=r"checkpoint's queue does not fit this model: other shapes \['keys: \(65536, 128\)",
    ):
        load_official_checkpoint(official("moco_v2_resnet50"), model, key_encoder, queue=queue)
    after = [*model.state_dict().values(), queue.keys]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    with pytest.raises(ValueError, match="a MoCo v1/v2 checkpoint has no predictor"):
        load_official_checkpoint(
            official("moco_v2_resnet50"), model, key_encoder, queue=queue, predictor=nn.Linear(2, 2)
        )
    base = nn.Sequential(resnet50_backbone(), moco_v3_projector(2048))
    with pytest.raises(ValueError, match="a MoCo v3 checkpoint has no queue"):
        load_official_checkpoint(
            official("moco_v3_resnet50"), base, MomentumEncoder(base), queue=queue,
            predictor=moco_v3_predictor(),
        )  # fmt: skip


def test_a_bad_flag_returns_the_usage_status() -> None:
    assert main(["a.pt", "b.pth", "--to", "onnx"]) == 2  # argparse's error, no SystemExit


def test_unwritable_outputs_and_odd_dicts_get_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    backbone, _ = strip_classifier(torchvision.models.resnet18())
    torch.save(backbone.state_dict(), src := tmp_path / "r18.pth")
    for dst in (tmp_path / "missing" / "x.pth", tmp_path):  # no folder; a folder
        for to in ("torchvision", "detectron2"):
            assert "cannot write" in run_main([str(src), str(dst), "--to", to], capsys)
    out = str(tmp_path / "out.pth")
    torch.save({1: torch.zeros(1)}, odd := tmp_path / "int_keys.pt")
    assert "not a string: 1" in run_main([str(odd), out, "--to", "timm"], capsys)
    ckpt = official("moco_v2_resnet50")
    ckpt["state_dict"]["module.encoder_q.note"] = "text"
    torch.save(ckpt, odd)
    assert "is a str, not a tensor" in run_main([str(odd), out, "--to", "timm"], capsys)


def test_timm_vits_torchvision_cannot_take_are_refused_or_completed() -> None:
    plain = timm.create_model("vit_tiny_patch16_224", num_classes=0, pretrained=False)
    no_class_row = timm.create_model(
        "vit_tiny_patch16_224", num_classes=0, pretrained=False, no_embed_class=True
    )
    with pytest.raises(LayoutError, match="no_embed_class"):
        backbone_state_dict(no_class_row.state_dict(), to="torchvision")
    no_bias = timm.create_model(
        "vit_tiny_patch16_224", num_classes=0, pretrained=False, qkv_bias=False
    )
    tv = torchvision.models.VisionTransformer(224, 16, 12, 3, 192, 768)
    result = tv.load_state_dict(backbone_state_dict(no_bias, to="torchvision"), strict=False)
    assert result.missing_keys == ["heads.head.weight", "heads.head.bias"]
    tv.heads = nn.Identity()
    x = torch.randn(1, 3, 224, 224, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(
            tv.double().eval()(x), no_bias.double().eval()(x), rtol=0, atol=1e-9
        )
    assert backbone_state_dict(plain, to="torchvision").keys() == tv.state_dict().keys()
