"""The kNN monitor samples its bank and queries at random and never puts a query in the bank;
a run's last line reports the kNN of the weights it stops with."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from example_runner import (
    DONE_LINE,
    STOP_KNN_LINE,
    V3,
    V12,
    checkpoint,
    import_examples,
    knn_baselines,
    run,
    run_2p_ranks,
    write_png,
)
from torch import nn

import_examples()
from data import datasets, evaluation_batches, knn_split  # noqa: E402
from harness import backbone, load_data  # noqa: E402
from monitoring import knn_accuracy  # noqa: E402

from momentum_contrast.knn import knn_predict  # noqa: E402

CLASSES, PER_CLASS, SIZE = 6, 60, 8


def image_folder(root: Path, val: bool) -> Path:
    """A class-sorted ImageFolder: each class a fixed random pattern plus strong noise, so
    raw pixels separate the classes often, not always (a query that is its own
    neighbour is then visible as a jump to 100%)."""
    g = torch.Generator().manual_seed(0)
    patterns = torch.rand(CLASSES, 3, SIZE, SIZE, generator=g)
    for split, n in [("train", PER_CLASS)] + ([("val", PER_CLASS // 2)] if val else []):
        for c in range(CLASSES):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                noise = torch.rand(3, SIZE, SIZE, generator=g)
                image = (0.2 * patterns[c] + 0.8 * noise) * 255
                write_png(image.round().to(torch.uint8), str(folder / f"{i}.png"))
    return root


def flags(root: Path) -> argparse.Namespace:
    return argparse.Namespace(
        data=str(root), image_size=SIZE, knn_bank=120, knn_queries=120, seed=0, workers=0,
        device="cpu",
    )  # fmt: skip


def random_split_accuracy(root: Path, args: argparse.Namespace, features: nn.Module) -> float:
    """Mean kNN top-1 (%) over 30 random disjoint splits of all images, as a reference."""
    train, val, _ = datasets(args.data, image_size=args.image_size)
    data = [
        b
        for d in ([train] if val is train else [train, val])
        for b in evaluation_batches(d, args.image_size, torch.device("cpu"))
    ]
    x = features(torch.cat([b[0] for b in data]))
    y = torch.cat([b[1] for b in data])
    g, accuracies = torch.Generator().manual_seed(1), []
    for _ in range(30):
        perm = torch.randperm(len(y), generator=g)
        q, b = perm[: args.knn_queries], perm[args.knn_queries : args.knn_queries + args.knn_bank]
        pred = knn_predict(x[q], x[b], y[b], CLASSES, k=len(b)).argmax(1)
        accuracies.append(100.0 * (pred == y[q]).float().mean().item())
    return sum(accuracies) / len(accuracies)


@pytest.mark.parametrize("val", [False, True], ids=["train-only", "train-and-val"])
def test_knn_accuracy_is_that_of_a_random_split(val: bool, tmp_path: Path) -> None:
    root = image_folder(tmp_path, val)
    args = flags(root)
    features = nn.Flatten()  # raw normalised pixels: a fixed feature extractor
    reference = random_split_accuracy(root, args, features)
    assert 50 < reference < 90  # neither trivial nor hopeless (chance: 17%; files are cropped)
    train, held_out, classes = datasets(args.data, image_size=args.image_size)
    accuracy = knn_accuracy(features, train, held_out, classes, args, torch.device("cpu"))
    assert abs(accuracy - reference) < 10, (accuracy, reference)


def test_queries_are_never_in_the_bank_and_the_subsets_are_fixed(tmp_path: Path) -> None:
    train, val, _ = datasets(flags(image_folder(tmp_path, val=False)).data)
    assert val is train
    bank, queries = knn_split(train, val, bank=1000, queries=1000, seed=0)
    assert not set(bank.tolist()) & set(queries.tolist())
    assert len(queries) == len(train) // 2 and len(bank) == len(train) - len(queries)
    bank, queries = knn_split(train, val, bank=60, queries=40, seed=0)
    assert not set(bank.tolist()) & set(queries.tolist())
    assert len(set(train.labels[bank].tolist())) == CLASSES  # every class, not the first ones
    again = knn_split(train, val, bank=60, queries=40, seed=0)
    assert torch.equal(again[0], bank) and torch.equal(again[1], queries)  # every epoch
    other = knn_split(train, val, bank=60, queries=40, seed=1)
    assert not torch.equal(other[0], bank)  # --seed chooses them


def test_only_rank_0_reports_the_knn_at_random_initialisation(tmp_path: Path) -> None:
    """Under torchrun only rank 0 measures the kNN; rank 1 used to print 0.0%."""
    data = ["--shapes-train", "400", "--shapes-val", "200", "--knn-bank", "400",
            "--knn-queries", "200"]  # fmt: skip
    out = tmp_path / "run"
    (rank0, _), (rank1, _) = run_2p_ranks(
        "moco_v2.py", *V12, *data, "--max-steps", "1", "--output-dir", str(out)
    )
    (knn,) = knn_baselines(rank0)
    assert knn > 10.0  # above chance (10 classes)
    assert round(checkpoint(out)["knn_baseline"], 1) == knn
    assert knn_baselines(rank1) == [] and "kNN top-1" not in rank1, rank1[-2000:]


@pytest.mark.parametrize(
    ("script", "flags", "stop", "prefix"),
    [("moco_v2.py", V12, 6, "0."), ("moco_v3.py", V3, 2, "0.0.")],
    ids=["v2-inside-epoch-2", "v3-inside-epoch-1"],
)
def test_a_stop_inside_an_epoch_reports_the_knn_of_the_weights_at_the_stop(
    script: str, flags: list[str], stop: int, prefix: str, tmp_path: Path
) -> None:
    """``--max-steps`` inside an epoch (4 steps each): the last line's kNN is measured on the
    weights at the stop, as the checkpoint holds them. It used to repeat the kNN at random
    initialisation (a stop inside the first epoch) or at the last epoch's end."""
    out = tmp_path / "run"
    result = run(script, *flags, "--max-steps", str(stop), "--output-dir", str(out))
    done, stopped = DONE_LINE.search(result.stdout), STOP_KNN_LINE.findall(result.stdout)
    assert done and stopped == [(str(stop), done[2])], result.stdout[-2000:]
    ckpt = checkpoint(out)
    args = argparse.Namespace(**ckpt["args"])
    features, _ = backbone(args.arch, args.image_size)  # the query encoder's, at the stop
    n = len(prefix)
    features.load_state_dict({k[n:]: v for k, v in ckpt["model"].items() if k.startswith(prefix)})
    train, val, classes = load_data(args)
    expected = knn_accuracy(features, train, val, classes, args, torch.device("cpu"))
    assert (ckpt["step"], done[2]) == (stop, f"{expected:.1f}"), result.stdout[-2000:]


def test_held_out_images_are_resized_and_center_cropped_as_the_reference(tmp_path: Path) -> None:
    """Image files were stretched to a square: the reference resizes the shorter side to 256
    and cuts the center 224 px (at 32 px: 37, then 32), a 32 px square file too. The
    built-in data sets, stored at one square size, are resized to the crop size."""
    from data import Images

    wide = torch.full((3, 40, 80), 255, dtype=torch.uint8)
    wide[..., 20:60] = 0  # only the middle half is black: the center crop sees nothing else
    square = torch.zeros(3, 32, 32, dtype=torch.uint8)
    square[:, :2] = 255  # a white border row that the 37 px resize and 32 px crop cut away
    files = []
    for name, image in (("wide", wide), ("square", square)):
        files.append(str(tmp_path / f"{name}.png"))
        write_png(image, files[-1])
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    [(x, y)] = evaluation_batches(Images(files, torch.tensor([7, 8])), 32, torch.device("cpu"))
    assert x.shape == (2, 3, 32, 32) and y.tolist() == [7, 8]
    torch.testing.assert_close(x[0], (torch.zeros(3, 32, 32) - mean[0]) / std[0])
    pixels = x[1] * std[0] + mean[0]  # the white rows, zoomed by 37 / 32, fall mostly outside
    assert pixels.max() < 0.5 and pixels[:, 8:].max() < 1e-6
    stored = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)  # CIFAR: as it is
    [(x, _)] = evaluation_batches(Images(stored, torch.tensor([0])), 32, torch.device("cpu"))
    torch.testing.assert_close(x, (stored / 255 - mean) / std)
    [(x, _)] = evaluation_batches(Images(stored, torch.tensor([0])), 48, torch.device("cpu"))
    assert x.shape == (1, 3, 48, 48)  # resized whole, not cropped
