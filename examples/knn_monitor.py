"""The kNN monitor of the pre-training scripts: weighted kNN top-1 on frozen features.

The bank (``--knn-bank`` training images) and the queries (``--knn-queries`` held-out
images) are uniform random subsets drawn once from ``--seed``, the same at every epoch.
ImageFolder lists files class by class, so taking the first files would give a bank of
the first classes only. Without a val/ folder the queries come from the training images,
and the bank and the queries are then disjoint: a query is never its own neighbour.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import torch
from image_data import Images, loader
from torch import nn

from momentum_contrast.knn import knn_predict

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def evaluation_batches(
    data: Images, args: argparse.Namespace, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Held-out style batches: each image resized to the training size, normalised."""
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    size = (args.image_size, args.image_size)
    for x, y in loader(Images(data.items, data.labels), args, 256):
        images = x if isinstance(x, list) else list(x)
        resize = nn.functional.interpolate
        x = torch.cat(
            [
                resize(i[None].to(device).float(), size=size, mode="bilinear", antialias=True)
                for i in images
            ]
        )
        yield (x / 255 - mean) / std, y.to(device)


def knn_split(
    train: Images, val: Images, bank: int, queries: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(bank into train, queries into val)``, uniform at random from ``seed``.

    When ``val is train`` (no held-out folder), the queries are drawn first, at most half
    of the images, and the bank from the rest: the two never share an image."""
    g = torch.Generator().manual_seed(seed)
    if val is train:
        perm = torch.randperm(len(train), generator=g)
        n_queries = min(queries, len(train) // 2)
        n_bank = min(bank, len(train) - n_queries)
        chosen_bank, chosen_queries = perm[n_queries : n_queries + n_bank], perm[:n_queries]
    else:  # the bank from labelled images only (STL-10's unlabeled split has label -1)
        labelled = (train.labels >= 0).nonzero().flatten()
        chosen_bank = labelled[torch.randperm(len(labelled), generator=g)[:bank]]
        chosen_queries = torch.randperm(len(val), generator=g)[:queries]
    return chosen_bank.sort().values, chosen_queries.sort().values  # files in folder order


def embed(
    features: nn.Module, data: Images, args: argparse.Namespace, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, D)`` float features of every image of ``data`` and their ``(N,)`` labels."""
    out, labels = [], []
    for x, y in evaluation_batches(data, args, device):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out.append(features(x).float())
        labels.append(y)
    return torch.cat(out), torch.cat(labels)


@torch.no_grad()
def knn_accuracy(
    features: nn.Module,
    train: Images,
    val: Images,
    classes: int,
    args: argparse.Namespace,
    device: torch.device,
) -> float:
    """Weighted kNN top-1 (%) of ``features`` (in eval mode) on a fixed random subset of
    the held-out split, with a fixed random subset of the training images as the bank."""
    was_training = features.training
    features.eval()
    bank_idx, query_idx = knn_split(train, val, args.knn_bank, args.knn_queries, args.seed)
    bank, bank_labels = embed(features, train.subset(bank_idx), args, device)
    feats, labels = embed(features, val.subset(query_idx), args, device)
    pred = knn_predict(feats, bank, bank_labels, classes, k=min(200, len(bank))).argmax(1)
    features.train(was_training)
    return 100.0 * (pred == labels).float().mean().item()
