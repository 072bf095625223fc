"""The command line never destroys a file by accident (not its source, also through links;
not an existing file without --overwrite; never half-written), and writes float32 arrays
for detectron2 whatever the floating dtype of the weights."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from test_convert_official import authors_detectron2_name
from torch import nn

from momentum_contrast import strip_classifier
from momentum_contrast.convert import main


def one_line_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def resnet18_backbone() -> nn.Module:
    torch.manual_seed(0)
    return strip_classifier(torchvision.models.resnet18())[0]


def training_checkpoint(path: Path) -> bytes:
    """A training checkpoint (model, optimizer state, step) at ``path``; its bytes."""
    model = resnet18_backbone()
    torch.save({"model": model.state_dict(), "optimizer": {"lr": 0.03}, "step": 7}, path)
    return path.read_bytes()


def test_the_source_is_never_overwritten(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "ckpt.pt"
    before = training_checkpoint(src)
    (tmp_path / "link.pt").symlink_to(src)
    os.link(src, tmp_path / "hard.pt")
    (tmp_path / "sub").mkdir()
    for dst in (
        src,
        tmp_path / "link.pt",
        tmp_path / "hard.pt",
        tmp_path / "sub" / ".." / "ckpt.pt",
    ):
        for extra in ([], ["--overwrite"]):
            err = one_line_error([str(src), str(dst), "--to", "torchvision", *extra], capsys)
            assert "is the source checkpoint" in err, (dst, extra)
    # the same through a link as the source
    err = one_line_error([str(tmp_path / "link.pt"), str(src), "--to", "timm"], capsys)
    assert "is the source checkpoint" in err
    assert src.read_bytes() == before


def test_an_existing_file_is_replaced_only_with_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    training_checkpoint(src := tmp_path / "ckpt.pt")
    dst = tmp_path / "backbone.pth"
    dst.write_bytes(b"an older conversion")
    err = one_line_error([str(src), str(dst), "--to", "torchvision"], capsys)
    assert err == f"error: cannot write {dst}: it exists (pass --overwrite to replace it)"
    assert dst.read_bytes() == b"an older conversion"
    assert main([str(src), str(dst), "--to", "torchvision", "--overwrite"]) == 0
    assert "conv1.weight" in torch.load(dst, weights_only=True)
    umask = os.umask(0)
    os.umask(umask)
    assert dst.stat().st_mode & 0o777 == 0o666 & ~umask  # as a plain open() would make it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backbone.pth", "ckpt.pt"]


def test_overwrite_keeps_the_replaced_files_permissions(tmp_path: Path) -> None:
    training_checkpoint(src := tmp_path / "ckpt.pt")
    dst = tmp_path / "backbone.pth"
    dst.write_bytes(b"an older, private conversion")
    dst.chmod(0o600)
    assert main([str(src), str(dst), "--to", "torchvision", "--overwrite"]) == 0
    assert "conv1.weight" in torch.load(dst, weights_only=True)
    assert dst.stat().st_mode & 0o777 == 0o600  # still private, not made world-readable


def test_a_failed_write_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    training_checkpoint(src := tmp_path / "ckpt.pt")
    dst = tmp_path / "backbone.pth"
    dst.write_bytes(b"an older conversion")

    def disk_full(obj: object, f: object) -> None:
        f.write(b"half a file")  # type: ignore[attr-defined]
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    err = one_line_error([str(src), str(dst), "--to", "torchvision", "--overwrite"], capsys)
    assert "cannot write" in err and "No space left on device" in err
    assert dst.read_bytes() == b"an older conversion"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backbone.pth", "ckpt.pt"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_detectron2_gets_float32_arrays_for_every_floating_dtype(
    dtype: torch.dtype, tmp_path: Path
) -> None:
    backbone = resnet18_backbone().to(dtype)
    torch.save(backbone.state_dict(), src := tmp_path / "backbone.pt")
    dst = tmp_path / "d2.pkl"
    assert main([str(src), str(dst), "--to", "detectron2"]) == 0
    with open(dst, "rb") as f:
        arrays = pickle.load(f)["model"]
    assert len(arrays) == len(backbone.state_dict())
    for name, value in backbone.state_dict().items():
        array = arrays[authors_detectron2_name(name)]
        if value.is_floating_point():
            assert array.dtype == np.float32, name
            assert np.array_equal(array, value.to(torch.float32).numpy()), name
        else:
            assert array.dtype == np.int64 and name.endswith("num_batches_tracked")


def test_bad_flags_get_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    training_checkpoint(src := tmp_path / "ckpt.pt")
    out = str(tmp_path / "out.pth")
    assert main([str(src), out, "--to", "timm", "--num-heads", "0"]) == 2
    assert capsys.readouterr().err == "error: num_heads must be positive, got 0\n"
