"""Draw the performance page's plot from the measured JSON in benchmarks/results/.

python docs/scripts/performance_plot.py   # writes docs/assets/performance.png (or argv[1])
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
OUT = ROOT / "docs" / "assets" / "performance.png"


def load(name: str) -> dict:  # type: ignore[type-arg]
    return json.loads((RESULTS / name).read_text())


def main() -> None:
    ema = load("h200-2026-11-28-ema_update.json")
    aug = load("h200-2026-11-28-augment.json")
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6))

    variants = {
        "reference .data loop": "reference .data loop",
        "MomentumEncoder.update()": "update()",
        "MomentumEncoder.update() in a CUDA graph": "update() in a CUDA graph",
        "floor": "bandwidth floor",
    }
    models = ["resnet50", "vit_b_16"]
    width = 0.2
    for i, (variant, label) in enumerate(variants.items()):
        ms = [
            next(r["ms"] for r in ema["rows"] if r["model"] == m and r["variant"] == variant)
            for m in models
        ]
        xs = [j + (i - 1.5) * width for j in range(len(models))]
        bars = left.bar(xs, ms, width, label=label)
        left.bar_label(bars, labels=[f"{v:.2g}" for v in ms], fontsize=7)
    left.set_yscale("log")
    left.set_xticks(range(len(models)), ["ResNet-50 (102 MB)", "ViT-B/16 (346 MB)"])
    left.set_ylabel("ms per update (log)")
    left.set_title("Momentum update")
    left.set_ylim(0.05, 60)
    left.legend(fontsize=7, ncol=2, loc="upper center")

    pipelines = {
        "reference CPU pipeline (PIL + torchvision), 16 workers": "reference, 16 CPU workers",
        "kornia v2, decoded 375x500 batch": "kornia 0.9.0",
        "momentum_contrast v2 (defaults: float32 colour ops), decoded 375x500 uint8 batch": (
            "MoCoV2Augment()"
        ),
        "momentum_contrast v2, float16, compiled colour ops, decoded 375x500 uint8 batch": (
            "float16, compile=True"
        ),
    }
    rates = [
        next(r["two-view samples/s"] for r in aug["rows"] if r["pipeline"] == p) for p in pipelines
    ]
    bars = right.barh(list(pipelines.values()), rates, color="tab:green")
    right.bar_label(bars, labels=[f"{v:,.0f}" for v in rates], fontsize=7)
    right.invert_yaxis()
    right.set_xlabel("two-view samples per second")
    right.set_title("MoCo v2 augmentation, batch 256")
    machine = ema["machine"]
    fig.suptitle(
        f"{machine['gpu']}, torch {machine['torch']}, {machine['date']}", fontsize=9, y=0.02
    )
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else OUT
    fig.savefig(out, dpi=90)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
