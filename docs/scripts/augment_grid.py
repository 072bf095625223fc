"""Draw the picture grid of the GPU-augmentation guide: real views from each recipe.

    python docs/scripts/augment_grid.py      # writes docs/assets/augment_grid.png (or argv[1])

The photo is matplotlib's bundled sample ``grace_hopper.jpg`` (public domain), so the
script needs no download. Each row is one recipe's view; each column one draw.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from matplotlib import cbook

from momentum_contrast.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MoCoV1Augment,
    MoCoV2Augment,
    MoCoV3Augment,
)

OUT = Path(__file__).resolve().parents[1] / "assets" / "augment_grid.png"
COLUMNS = 6


def load_photo() -> torch.Tensor:
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        image = plt.imread(f)  # (H, W, 3) uint8
    return torch.from_numpy(image.copy()).permute(2, 0, 1)  # (3, H, W) uint8


def to_display(views: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (views * std + mean).clamp(0, 1).permute(0, 2, 3, 1)  # (B, H, W, 3)


def main() -> None:
    photo = load_photo()
    batch = photo.unsqueeze(0).expand(COLUMNS, -1, -1, -1).contiguous()  # (B, 3, H, W)
    generator = torch.Generator().manual_seed(0)
    rows: list[tuple[str, torch.Tensor]] = []
    for name, recipe in (
        ("v1", MoCoV1Augment(160)),
        ("v2", MoCoV2Augment(160)),
        ("v3", MoCoV3Augment(160)),
    ):
        view_1, view_2 = recipe(batch, generator=generator)
        rows.append((f"{name} view 1", to_display(view_1)))
        if name == "v3":  # v3's two views differ (blur 1.0 / 0.1, solarize 0 / 0.2)
            rows.append((f"{name} view 2", to_display(view_2)))
    fig, axes = plt.subplots(len(rows) + 1, COLUMNS, figsize=(COLUMNS * 1.6, (len(rows) + 1) * 1.7))
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].imshow(photo.permute(1, 2, 0).numpy())
    axes[0, 0].set_ylabel("input", fontsize=9)
    for ax in axes[0, 1:]:
        ax.axis("off")
    for r, (label, views) in enumerate(rows, start=1):
        axes[r, 0].set_ylabel(label, fontsize=9)
        for c in range(COLUMNS):
            axes[r, c].imshow(views[c].numpy())
    fig.tight_layout(pad=0.3)
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else OUT
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
