"""Image files: 16-bit PNGs are decoded to uint8 like the rest; a broken file is named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from example_runner import V12, import_examples, losses, run, write_png
from PIL import Image

import_examples()
from data import Images, datasets, decode, loader  # noqa: E402


def folder_with_a_16_bit_png(root: Path) -> Path:
    for split in ("train", "val"):
        for c, level in enumerate((40, 200)):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(10):
                img = torch.full((3, 36 + i, 40), level, dtype=torch.uint8)
                write_png(img, str(folder / f"{i}.png"))
    wide = (np.arange(36 * 40, dtype=np.uint16).reshape(36, 40) % 256) * 257  # 8-bit v -> 257 v
    Image.fromarray(wide).save(root / "train" / "class1" / "deep.png")  # 16-bit grayscale
    return root


def test_16_bit_png_is_scaled_to_uint8(tmp_path: Path) -> None:
    root = folder_with_a_16_bit_png(tmp_path / "data")
    train, _, _ = datasets(str(root))
    i = next(i for i, p in enumerate(train.items) if p.endswith("deep.png"))
    image, label = train[i]
    assert image.dtype == torch.uint8 and image.shape == (3, 36, 40) and label == 1
    expected = torch.arange(36 * 40).reshape(36, 40) % 256
    assert all(torch.equal(channel.long(), expected) for channel in image)
    out = tmp_path / "run"
    run("moco_v2.py", *V12, "--data", str(root), "--max-steps", "2", "--output-dir", str(out))
    assert len(losses(out)) == 2


@pytest.mark.parametrize("workers", [0, 1])
def test_a_corrupt_file_is_named(workers: int, tmp_path: Path) -> None:
    folder = tmp_path / "data" / "train" / "cats"
    folder.mkdir(parents=True)
    write_png(torch.zeros(3, 8, 8, dtype=torch.uint8), str(folder / "good.png"))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"truncated" * 10)
    train, _, _ = datasets(str(tmp_path / "data"))
    with pytest.raises(RuntimeError, match=r"cannot decode image file .*broken\.jpg"):
        list(loader(Images(train.items, train.labels), 2, workers=workers, seed=0))


def test_an_animated_gif_gives_its_first_frame(tmp_path: Path) -> None:
    """TorchCodec and torchvision decode every frame, (frames, C, H, W); an image is one
    (data.decode, which every script reads its image files with)."""
    frames = [np.full((8, 8, 3), 40 * i, dtype=np.uint8) for i in range(1, 4)]
    pictures = [Image.fromarray(f) for f in frames]
    pictures[0].save(gif := tmp_path / "anim.gif", save_all=True, append_images=pictures[1:])
    decoded = decode(str(gif))
    assert decoded.shape == (3, 8, 8)
    assert torch.equal(decoded, torch.from_numpy(frames[0]).permute(2, 0, 1))
