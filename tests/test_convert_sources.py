"""momentum_contrast.convert finds the query and the key encoder by content: through
torch.compile and DataParallel wrappers, in Lightning-style, solo-learn-style and guide-style
checkpoints, in the authors' checkpoints with ``module.`` stripped; what stays ambiguous
gets a message that leads to ``--prefix``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
import torch
import torchvision
from conftest import perturb_
from torch import nn
from torchvision.models import ResNet

from momentum_contrast import KeyQueue, MomentumEncoder, moco_v2_head, strip_classifier
from momentum_contrast.convert import (
    LayoutError,
    backbone_state_dict,
    checkpoint_kind,
    load_official_checkpoint,
    main,
)

State = dict[str, torch.Tensor]


def pair() -> tuple[nn.Sequential, MomentumEncoder]:
    """A v2 query model (ResNet-18 and head) and its key encoder, apart from each other."""
    torch.manual_seed(0)
    backbone, dim = strip_classifier(torchvision.models.resnet18())
    model = nn.Sequential(backbone, moco_v2_head(dim))
    key_encoder = MomentumEncoder(model)
    perturb_(model, scale=0.01)
    return model, key_encoder


def assert_same(result: State, expected: nn.Module) -> None:
    """``result`` holds exactly ``expected``'s state, tensor for tensor."""
    own = expected.state_dict()
    assert result.keys() == own.keys()
    assert all(torch.equal(result[k], v) for k, v in own.items())


def key_backbone(key_encoder: MomentumEncoder) -> nn.Module:
    """``key_encoder.key_encoder[0]``: the key side's copy of ``model[0]``."""
    return cast(nn.Sequential, key_encoder.key_encoder)[0]


def query_and_key(model: nn.Sequential, key_encoder: MomentumEncoder) -> tuple[ResNet, ResNet]:
    """The two ResNet-18 backbones (strip_classifier keeps the model's class)."""
    return cast(ResNet, model[0]), cast(ResNet, key_backbone(key_encoder))


@pytest.mark.parametrize("wrap", [torch.compile, nn.DataParallel], ids=["compile", "DataParallel"])
def test_a_wrapped_momentum_encoder_gives_each_of_its_encoders(
    wrap: Callable[[nn.Module], nn.Module],
) -> None:
    model, key_encoder = pair()
    query, key = query_and_key(model, key_encoder)
    wrapped = wrap(key_encoder)
    assert_same(backbone_state_dict(wrapped), query)
    assert_same(backbone_state_dict(wrapped, encoder="key"), key)
    assert not torch.equal(query.conv1.weight, key.conv1.weight)


def authors_names(prefix: str, model: nn.Module) -> State:
    """The MoCo v1/v2 authors' names: the backbone at the top, the MLP head at ``fc``."""
    return {
        prefix + (k[2:] if k.startswith("0.") else "fc." + k[2:]): v
        for k, v in model.state_dict().items()
    }


def layouts(model: nn.Sequential, key_encoder: MomentumEncoder) -> dict[str, dict[str, Any]]:
    """Two-encoder checkpoints as other code writes them."""

    class LitMoCo(nn.Module):  # a LightningModule holding the model and a MomentumEncoder
        def __init__(self) -> None:
            super().__init__()
            self.model, self.key_encoder = model, key_encoder

    key = key_backbone(key_encoder)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()  # lr 0: the weights stay, the optimizer gets per-parameter state
    return {
        "lightning": {
            "epoch": 3, "global_step": 30, "pytorch-lightning_version": "2.5.0",
            "state_dict": LitMoCo().state_dict(),
            "optimizer_states": [optimizer.state_dict()], "lr_schedulers": [],
            "hyper_parameters": {"lr": 0.03},
        },
        "solo_learn": {
            **{f"backbone.{k}": v for k, v in model[0].state_dict().items()},
            **{f"backbone_momentum.{k}": v for k, v in key.state_dict().items()},
            **{f"projector.{k}": v for k, v in model[1].state_dict().items()},
        },
        "authors_without_module": {
            "epoch": 200, "arch": "resnet18",
            "state_dict": {
                **authors_names("encoder_q.", model),
                **authors_names("encoder_k.", key_encoder.key_encoder),
                "queue": nn.functional.normalize(torch.randn(128, 16), dim=0),
                "queue_ptr": torch.zeros(1, dtype=torch.long),
            },
        },
        "checkpointing_guide": {
            "model": model.state_dict(), "key_encoder": key_encoder.state_dict(),
            "queue": KeyQueue(16, 128).state_dict(), "optimizer": optimizer.state_dict(),
            "step": 1,
        },
    }  # fmt: skip


@pytest.mark.parametrize(
    "layout", ["lightning", "solo_learn", "authors_without_module", "checkpointing_guide"]
)
def test_two_encoder_checkpoints_give_each_encoder(layout: str, tmp_path: Path) -> None:
    model, key_encoder = pair()
    ckpt = layouts(model, key_encoder)[layout]
    query, key = query_and_key(model, key_encoder)
    assert_same(backbone_state_dict(ckpt), query)
    assert_same(backbone_state_dict(ckpt, encoder="key"), key)
    torch.save(ckpt, src := tmp_path / "two_encoders.ckpt")
    dst = tmp_path / "key.pth"
    assert main([str(src), str(dst), "--to", "torchvision", "--encoder", "key"]) == 0
    assert_same(torch.load(dst, weights_only=True), key)


def test_the_authors_checkpoint_without_module_loads_into_the_pieces() -> None:
    model, key_encoder = pair()
    ckpt = layouts(model, key_encoder)["authors_without_module"]
    assert checkpoint_kind(ckpt) == "official_v1v2"
    model_2 = pair()[0]
    perturb_(model_2, seed=1)
    key_2 = MomentumEncoder(model_2)
    queue = KeyQueue(16, 128)
    load_official_checkpoint(ckpt, model_2, key_2, queue=queue)
    assert_same(model_2[0].state_dict(), model[0])
    assert_same(key_backbone(key_2).state_dict(), key_backbone(key_encoder))
    assert torch.equal(queue.keys, ckpt["state_dict"]["queue"].T)


def test_the_authors_checkpoint_without_a_queue(tmp_path: Path) -> None:
    model, key_encoder = pair()
    ckpt = layouts(model, key_encoder)["authors_without_module"]
    state = {"module." + k: v for k, v in ckpt["state_dict"].items() if "queue" not in k}
    ckpt = {"epoch": 200, "arch": "resnet18", "state_dict": state}
    model_2 = pair()[0]
    perturb_(model_2, seed=1)
    key_2 = MomentumEncoder(model_2)
    with pytest.raises(LayoutError, match=r"holds no queue \(module.queue\): pass queue=None"):
        load_official_checkpoint(ckpt, model_2, key_2, queue=KeyQueue(16, 128))
    info = load_official_checkpoint(ckpt, model_2, key_2)
    assert info == {"kind": "official_v1v2", "epoch": 200, "arch": "resnet18"}
    assert_same(model_2[0].state_dict(), model[0])
    assert_same(key_backbone(key_2).state_dict(), key_backbone(key_encoder))


def test_what_stays_ambiguous_leads_to_prefix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, key_encoder = pair()
    query, key = query_and_key(model, key_encoder)
    ckpt = {"student": model.state_dict(), "teacher": key_encoder.key_encoder.state_dict()}
    with pytest.raises(
        LayoutError,
        match=r"holds 2 query encoders, at 'student.0.', 'teacher.0.': choose one with --prefix",
    ):
        backbone_state_dict(ckpt)
    assert_same(backbone_state_dict(ckpt, prefix="teacher"), key)
    assert_same(backbone_state_dict(ckpt, prefix="student."), query)
    with pytest.raises(LayoutError, match="no backbone under prefix 'pupil'"):
        backbone_state_dict(ckpt, prefix="pupil")
    with pytest.raises(
        LayoutError, match=r"holds no key encoder: its backbone at 'teacher\.0\.' is not named"
    ):
        backbone_state_dict(ckpt, prefix="teacher", encoder="key")
    torch.save(ckpt, src := tmp_path / "byol_like.pt")
    dst = tmp_path / "teacher.pth"
    assert main([str(src), str(dst), "--to", "torchvision", "--prefix", "teacher"]) == 0
    assert_same(torch.load(dst, weights_only=True), key)
    capsys.readouterr()
    assert main([str(src), str(tmp_path / "x.pth"), "--to", "timm"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "--prefix" in err


def test_a_lone_key_encoder_says_to_ask_for_it() -> None:
    _, key_encoder = pair()
    alone = key_encoder.state_dict()  # a MomentumEncoder's state: key_encoder.*
    with pytest.raises(
        LayoutError, match=r"holds only a key encoder, at 'key_encoder.0.': pass --encoder key"
    ):
        backbone_state_dict(alone)
    assert_same(backbone_state_dict(alone, encoder="key"), key_backbone(key_encoder))


def test_a_float32_key_encoder_of_a_bfloat16_model_converts_at_float32() -> None:
    torch.manual_seed(0)
    backbone, dim = strip_classifier(torchvision.models.resnet18())
    model = nn.Sequential(backbone, moco_v2_head(dim)).bfloat16()
    key_encoder = MomentumEncoder(model, ema_dtype=torch.float32)
    perturb_(model, scale=0.01)
    key_encoder.update()
    ckpt = {"model": model.state_dict(), "key_encoder": key_encoder.state_dict()}
    result = backbone_state_dict(ckpt, encoder="key")
    assert_same(result, key_backbone(key_encoder))
    assert result["conv1.weight"].dtype == torch.float32  # the average's precision kept
    assert backbone_state_dict(ckpt, encoder="query")["conv1.weight"].dtype == torch.bfloat16


def test_a_directory_is_named_as_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(IsADirectoryError, match="is a directory, not a checkpoint file"):
        checkpoint_kind(tmp_path)
    assert main([str(tmp_path), str(tmp_path / "out.pth"), "--to", "timm"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {tmp_path} is a directory, not a checkpoint file"


def test_a_device_is_named_as_no_regular_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """/dev/null exists: it was "no such checkpoint file"."""
    with pytest.raises(LayoutError, match="/dev/null is not a regular file"):
        checkpoint_kind("/dev/null")
    assert main(["/dev/null", str(tmp_path / "out.pth"), "--to", "timm"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: /dev/null is not a regular file, not a checkpoint file"
    assert not (tmp_path / "out.pth").exists()


class OwnPath:
    """An ``os.PathLike`` that is not a ``pathlib.Path`` (as ``upath`` or ``etils`` give)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __fspath__(self) -> str:
        return str(self.path)


def test_any_os_pathlike_is_a_path(tmp_path: Path) -> None:
    """``backbone_state_dict`` took a ``str`` or a ``Path`` only (``checkpoint_kind`` and the
    authors' loader any ``os.PathLike``)."""
    model, _ = pair()
    torch.save({"model": model.state_dict()}, path := tmp_path / "ckpt.pt")
    by_path, by_own = backbone_state_dict(path), backbone_state_dict(OwnPath(path))  # type: ignore[arg-type]
    assert by_own.keys() == by_path.keys()
    assert all(torch.equal(by_own[k], v) for k, v in by_path.items())
    torch.save({"model": {"w": torch.ones(2)}}, other := tmp_path / "other.pt")
    with pytest.raises(LayoutError) as refused:  # messages name the file as a path would
        backbone_state_dict(OwnPath(other))  # type: ignore[arg-type]
    assert str(refused.value).startswith(str(other))


def test_a_0_3_0_float32_copy_is_not_a_second_encoder() -> None:
    torch.manual_seed(0)
    backbone, dim = strip_classifier(torchvision.models.resnet18())
    model = nn.Sequential(backbone, moco_v2_head(dim)).bfloat16()
    key = MomentumEncoder(model).state_dict()  # key_encoder.* in bfloat16, as 0.3.0 saved
    state = {**key, **{f"ema_shadow.{k[len('key_encoder.') :]}": v.float() for k, v in key.items()}}
    with pytest.raises(LayoutError, match="holds only a key encoder"):
        backbone_state_dict(state)  # not the copy taken for a query encoder
    result = backbone_state_dict(state, encoder="key")
    assert result["conv1.weight"].dtype == torch.bfloat16  # the key weights, not the copy
