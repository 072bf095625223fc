"""The example scripts end to end: images/s and peak GPU memory for a few hundred steps.

    python benchmarks/examples_end_to_end.py          # on a GPU (full sizes)
    python benchmarks/examples_end_to_end.py --cpu    # tiny sizes, to check the harness

Writes synthetic ImageNet-like JPEGs in ImageFolder layout, then runs
examples/moco_v2.py (ResNet-50) and examples/moco_v3.py (ViT-S) on them, and on the
in-memory `shapes` data at the same size (decoding taken out), reading images/s from
each run's metrics.csv (median over the steps after the first 20) and the peak GPU
memory from its last line.
"""

from __future__ import annotations

import csv
import io
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from common import pick_device, save
from PIL import Image, ImageDraw

device = pick_device()
gpu = device.type == "cuda"
ROOT = Path(__file__).resolve().parents[1]
STEPS = 300 if gpu else 4
SIZE, BATCH = (224, 256) if gpu else (32, 8)
N_IMAGES = 4096 if gpu else 64


def write_jpegs(root: Path) -> None:
    rnd = random.Random(0)
    for split, n in (("train", N_IMAGES), ("val", N_IMAGES // 8)):
        for c in range(4):
            (root / split / f"class{c}").mkdir(parents=True)
        for i in range(n):
            w, h = rnd.choice([(500, 375), (375, 500), (500, 333)])
            img = Image.new("RGB", (w, h), tuple(rnd.randrange(256) for _ in range(3)))
            draw = ImageDraw.Draw(img)
            for _ in range(8):
                x, y = rnd.randrange(w), rnd.randrange(h)
                draw.ellipse(
                    (x, y, x + rnd.randrange(20, 150), y + rnd.randrange(20, 150)),
                    fill=tuple(rnd.randrange(256) for _ in range(3)),
                )
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90)
            (root / split / f"class{i % 4}" / f"{i}.jpg").write_bytes(buf.getvalue())


def run(script: str, data: str, arch: str, out: Path) -> dict[str, object]:
    flags = [
        "--data", data, "--arch", arch, "--image-size", str(SIZE), "--batch-size", str(BATCH),
        "--max-steps", str(STEPS), "--epochs", "100", "--output-dir", str(out),
        "--device", device.type, "--workers", str(min(16, os.cpu_count() or 1)),
        "--knn-bank", "512", "--knn-queries", "256", "--shapes-train", str(N_IMAGES),
        "--shapes-val", str(N_IMAGES // 8),
    ]  # fmt: skip
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *flags],
        capture_output=True,
        text=True,
        cwd=ROOT / "examples",
    )
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    with open(out / "metrics.csv") as f:
        rates = [float(r["images_per_s"]) for r in csv.DictReader(f) if r["images_per_s"]]
    peak = re.search(r"peak GPU memory ([\d.]+) GiB", result.stdout)
    return {
        "script": script,
        "arch": arch,
        "data": "JPEG ImageFolder" if data != "shapes" else "in memory",
        "images/s": statistics.median(rates[20:] or rates),
        "peak GiB": float(peak.group(1)) if peak else 0.0,
    }


rows: list[dict[str, object]] = []
with tempfile.TemporaryDirectory() as tmp:
    write_jpegs(Path(tmp) / "jpegs")
    for script, arch in (("moco_v2.py", "resnet50"), ("moco_v3.py", "vit_small")):
        if not gpu:
            arch = "small_cnn"
        for data in (str(Path(tmp) / "jpegs"), "shapes"):
            rows.append(run(script, data, arch, Path(tmp) / f"run_{len(rows)}"))
            print(rows[-1], flush=True)
save(
    "examples_end_to_end",
    rows,
    {
        "device": str(device),
        "batch": BATCH,
        "size": SIZE,
        "steps": STEPS,
        "torch": torch.__version__,
    },
)
