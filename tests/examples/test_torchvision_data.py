"""``--data cifar10|cifar100|stl10``: the scripts read torchvision's on-disk formats under
``--data-root`` (files written here, holding the built-in shapes so a kNN can beat chance),
with the recipes' defaults (the authors' CIFAR-10 demo). torchvision checks the files'
MD5 sums against the real datasets': a ``sitecustomize`` on the scripts' path switches
that check off for these tests only (the scripts are unchanged)."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
from example_runner import checkpoint, import_examples, knn_baselines, losses, run

import_examples()
from data import make_shapes  # noqa: E402

SITECUSTOMIZE = """
import torchvision.datasets.cifar as cifar, torchvision.datasets.stl10 as stl10
cifar.check_integrity = lambda *args, **kwargs: True
cifar.CIFAR10._check_integrity = lambda self: True
stl10.STL10._check_integrity = lambda self: True
"""


def shapes_hwc(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = make_shapes(n, size, seed=seed)
    return x.permute(0, 2, 3, 1).numpy(), y.numpy()  # (N, H, W, 3) as the files hold


def write_cifar(root: Path, hundred: bool, train: int = 500, test: int = 100) -> None:
    """CIFAR-10 (five data batches, a test batch, batches.meta) or CIFAR-100 (train, test,
    meta): pickled dicts of (N, 3072) channel-major uint8 rows and their labels."""
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    key = "fine_labels" if hundred else "labels"

    def dump(name: str, n: int, seed: int) -> None:
        x, y = shapes_hwc(n, 32, seed)
        rows = x.transpose(0, 3, 1, 2).reshape(n, 3072)  # as the files: R, G, B planes
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rows, key: y.tolist()}, f)

    if hundred:
        dump("train", train, 1)
        dump("test", test, 2)
        meta = {"fine_label_names": [f"c{i}" for i in range(100)]}
        (folder / "meta").write_bytes(pickle.dumps(meta))
    else:
        for i in range(5):
            dump(f"data_batch_{i + 1}", train // 5, 10 + i)
        dump("test_batch", test, 2)
        (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": list("abcdefghij")}))


def write_stl10(root: Path, train: int = 80, unlabeled: int = 80, test: int = 80) -> None:
    """stl10_binary/: column-major (N, 3, 96, 96) uint8 images and 1-based uint8 labels."""
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    for split, n, seed in (("train", train, 1), ("test", test, 2), ("unlabeled", unlabeled, 3)):
        x, y = shapes_hwc(n, 96, seed)
        x.transpose(0, 3, 2, 1).tofile(folder / f"{split}_X.bin")  # (N, 3, W, H) on disk
        if split != "unlabeled":
            (y + 1).astype(np.uint8).tofile(folder / f"{split}_y.bin")
    (folder / "class_names.txt").write_text("\n".join(f"c{i}" for i in range(10)))


@pytest.fixture
def data_env(tmp_path: Path) -> dict[str, str]:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return {"PYTHONPATH": str(site)}


SMALL = ["--device", "cpu", "--workers", "0", "--epochs", "1", "--batch-size", "16"]


def test_cifar10_defaults_are_the_authors_demo(tmp_path: Path) -> None:
    out = run("moco_v2.py", "--data", "cifar10", "--data-root", str(tmp_path), "--print-config")
    config = json.loads(out.stdout)
    want = {"arch": "resnet18", "batch_size": 512, "queue_size": 4096, "moco_momentum": 0.99,
            "temperature": 0.1, "lr": 0.06, "weight_decay": 5e-4, "epochs": 200,
            "image_size": 32, "blur_p": 0.0}  # fmt: skip
    assert {k: config[k] for k in want} == want


@pytest.mark.parametrize(("script", "hundred"), [("moco_v2.py", False), ("moco_v3.py", True)])
def test_pretraining_on_cifar_files(
    tmp_path: Path, data_env: dict[str, str], script: str, hundred: bool
) -> None:
    write_cifar(tmp_path / "data", hundred)
    out = tmp_path / "run"
    flags = [*SMALL, "--data", "cifar100" if hundred else "cifar10", "--max-steps", "3"]
    flags += ["--data-root", str(tmp_path / "data"), "--output-dir", str(out)]
    flags += ["--knn-bank", "500", "--knn-queries", "100"]
    flags += ["--mlp-dim", "64", "--dim", "32"] if script == "moco_v3.py" else []
    flags += ["--queue-size", "64", "--shuffle-splits", "2"] if script == "moco_v2.py" else []
    result = run(script, *flags, env=data_env)
    values = losses(out)
    assert len(values) == 3 and all(math.isfinite(v) and v > 0 for v in values), values
    (knn,) = knn_baselines(result.stdout)
    assert knn > 100 / (100 if hundred else 10)  # the shapes are told apart by random features
    args = checkpoint(out)["args"]
    assert args["arch"] == "resnet18" and args["image_size"] == 32


def test_stl10_pretrains_on_unlabeled_and_train_and_evaluates_on_train(
    tmp_path: Path, data_env: dict[str, str]
) -> None:
    write_stl10(tmp_path / "data")
    out = tmp_path / "run"
    root = ["--data", "stl10", "--data-root", str(tmp_path / "data")]
    flags = [*SMALL, *root, "--output-dir", str(out), "--arch", "small_cnn"]
    flags += ["--queue-size", "64", "--shuffle-splits", "2", "--knn-bank", "1000"]
    result = run("moco_v2.py", *flags, env=data_env)
    # 80 train + 80 unlabeled images: 10 steps of 16 (the unlabeled images are trained on)
    assert len(losses(out)) == 10, losses(out)
    (knn,) = knn_baselines(result.stdout)
    assert knn > 10.0  # a bank of the 80 labelled images only (-1 labels would crash it)
    evaluation = run(
        "linear_eval.py", "--pretrained", str(next(out.glob("checkpoint_*.pt"))), *root,
        "--device", "cpu", "--workers", "0", "--epochs", "1", "--batch-size", "16",
        "--output-dir", str(tmp_path / "eval"), env=data_env,
    )  # fmt: skip
    assert "top-1" in evaluation.stdout, evaluation.stdout[-2000:]
