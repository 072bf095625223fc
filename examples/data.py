"""The example scripts' data, and nothing else: no flags, no training loop, no checkpoints.

* ``make_shapes``: the built-in ``shapes`` images, drawn procedurally (no download).
* ``datasets``: (train, held-out, classes) for ``shapes``, CIFAR-10/100 and STL-10 (through
  torchvision, under a root folder) or an ImageFolder (train/ and an optional val/).
* ``decode``: an image file as ``(3, H, W)`` uint8 RGB, with TorchCodec or torchvision.
* ``Images``, ``collate``, ``epoch_batches``, ``loader``: a dataset of uint8 images, a rank's
  batches of an epoch fixed by (seed, epoch), and the loader that reads them.
* ``knn_split``, ``evaluation_batches``: the kNN monitor's fixed random images, and every
  image resized and normalised, for the kNN monitor and the linear evaluation.

The scripts, harness.py and monitoring.py import it (``from data import ...``); it imports none
of them.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import math
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

# ---- shapes: ten classes (circle, square, triangle, pentagon, hexagon, star, ring, cross,
# ellipse, half-disc), each with a random size, position, slight tilt, on a plain background:
# only the shape identifies the class. Deterministic from the seed; drawn batched in torch.
SHAPE_CLASSES = (
    "circle", "square", "triangle", "pentagon", "hexagon",
    "star", "ring", "cross", "ellipse", "half-disc",
)  # fmt: skip


def _polygon(rho: torch.Tensor, phi: torch.Tensor, r: torch.Tensor, n: int) -> torch.Tensor:
    sector = 2 * math.pi / n
    return rho * torch.cos(torch.remainder(phi, sector) - sector / 2) < r * math.cos(math.pi / n)


def make_shapes(n: int, size: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images ``(n, 3, size, size)`` uint8 and their labels ``(n,)`` in ``0..9``."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % len(SHAPE_CLASSES)
    labels = labels[torch.randperm(n, generator=g)]

    def u(*shape: int, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(*shape, generator=g)

    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    r = u(n, 1, 1, lo=0.35, hi=0.65)
    cx, cy = u(n, 1, 1, lo=-0.25, hi=0.25), u(n, 1, 1, lo=-0.25, hi=0.25)
    theta = u(n, 1, 1, lo=-0.3, hi=0.3)  # a slight tilt only: orientation is no identity
    dx, dy = xx - cx, yy - cy
    uu = dx * torch.cos(theta) + dy * torch.sin(theta)  # rotated coordinates
    vv = -dx * torch.sin(theta) + dy * torch.cos(theta)
    rho, phi = torch.sqrt(uu**2 + vv**2), torch.atan2(vv, uu)
    masks = torch.stack(
        [
            rho < r,
            torch.maximum(uu.abs(), vv.abs()) < 0.8 * r,
            _polygon(rho, phi, r, 3),
            _polygon(rho, phi, r, 5),
            _polygon(rho, phi, r, 6),
            rho < r * (0.6 + 0.4 * torch.cos(5 * phi)),
            (rho < r) & (rho > 0.6 * r),
            ((uu.abs() < 0.3 * r) & (vv.abs() < r)) | ((vv.abs() < 0.3 * r) & (uu.abs() < r)),
            (uu / r) ** 2 + (vv / (0.5 * r)) ** 2 < 1,
            (rho < r) & (vv > 0),
        ]
    )  # (10, n, size, size)
    mask = masks[labels, torch.arange(n)].float()[:, None]  # (n, 1, size, size)
    # a light shape on a dark background, the same for every image: nothing but the shape
    # (its class, size, position and a slight tilt) tells images apart, so contrastive
    # learning has to learn shapes rather than colours or textures unique to an image.
    bg = torch.full((n, 3, 1, 1), 0.15)
    fg = torch.full((n, 3, 1, 1), 0.9)
    img = mask * fg + (1 - mask) * bg + 0.02 * torch.randn(n, 3, size, size, generator=g)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8), labels


# ---- Image files
@functools.cache
def has_torchcodec() -> bool:
    return importlib.util.find_spec("torchcodec") is not None


def decode(path: str) -> torch.Tensor:
    """``(3, H, W)`` uint8 RGB; 16-bit PNGs rounded to 8 bits; a broken file is named. With
    TorchCodec (torchvision's decoders are deprecated for it since torchvision 0.29), else
    torchvision's, without the deprecation warning (it only says TorchCodec is missing)."""
    try:
        if has_torchcodec():
            from torchcodec.decoders import decode_image

            image = decode_image(path, mode="RGB", output_dtype="auto")
        else:
            import torchvision.io as io

            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", ".*superseded.*TorchCodec", DeprecationWarning)
                image = io.decode_image(path, mode=io.ImageReadMode.RGB)
    except (RuntimeError, ValueError, OSError) as e:
        raise RuntimeError(f"cannot decode image file {path}: {e}") from e
    if image.ndim == 4:  # an animated GIF (frames, C, H, W): its first frame
        image = image[0]
    if image.dtype == torch.uint16:  # 0 -> 0, 65535 -> 255, 257 * v -> v
        image = ((image.to(torch.int32) * 255 + 32767) // 65535).to(torch.uint8)
    return image


# ---- The data sets
class Images(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Images as a uint8 tensor (N, C, H, W) or a list of files, and their labels. With a
    ``transform`` (augmentation in the loader workers), item ``(i, seed)`` is image i's two
    views, drawn from ``seed``: the same views from any worker, and after a resume."""

    def __init__(self, items: Any, labels: torch.Tensor, transform: Any = None) -> None:
        self.items, self.labels, self.transform = items, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: torch.Tensor) -> Images:
        """The images at ``idx`` (a 1-d index tensor), without the transform."""
        if isinstance(self.items, torch.Tensor):
            return Images(self.items[idx], self.labels[idx])
        return Images([self.items[i] for i in idx.tolist()], self.labels[idx])

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Any, torch.Tensor]:
        i, seed = key if isinstance(key, tuple) else (key, None)
        item = decode(self.items[i]) if isinstance(self.items, list) else self.items[i]
        if self.transform is not None:
            g = None if seed is None else torch.Generator().manual_seed(seed)
            item = tuple(v[0] for v in self.transform(item[None], generator=g))
        return item, self.labels[i]  # a 0-d tensor: no host read in the loop


def datasets(
    name: str,
    root: str = "data",
    image_size: int = 32,
    shapes_train: int = 4000,
    shapes_val: int = 1000,
    *,
    unlabeled: bool = True,
) -> tuple[Images, Images, int]:
    """(train, held-out, classes) of ``name``: 'shapes' (``shapes_train`` + ``shapes_val``
    images of ``image_size`` px), 'cifar10', 'cifar100', 'stl10' (a copy under ``root``, else
    downloaded there; STL-10 trains on train + ``unlabeled``, whose label is -1, and holds out
    test) or a folder with train/ [and val/]. Without val/ the held-out split *is* the training
    set (the same object). Errors (``FileNotFoundError``, ``RuntimeError``) say what is
    missing."""
    if name == "shapes":
        x, y = make_shapes(shapes_train + shapes_val, image_size, seed=1234)
        return (
            Images(x[:shapes_train], y[:shapes_train]),
            Images(x[shapes_train:], y[shapes_train:]),
            10,
        )
    import torchvision.datasets as tvd

    def load(cls: Any, **split: Any) -> Any:
        try:
            return cls(root, download=False, **split)
        except RuntimeError:  # not there: downloaded
            try:
                return cls(root, download=True, **split)
            except Exception as e:
                why = f"{type(e).__name__}: {e}"
                raise RuntimeError(f"no copy under {root} and the download failed ({why})") from e

    if name == "stl10":  # (N, 3, 96, 96) uint8
        stl_splits = ("train+unlabeled" if unlabeled else "train", "test")
        sets = [load(tvd.STL10, split=split) for split in stl_splits]
        train, test = (
            Images(torch.from_numpy(d.data), torch.from_numpy(d.labels).long()) for d in sets
        )
        return train, test, 10
    if name in ("cifar10", "cifar100"):  # (N, 32, 32, 3) -> (N, 3, 32, 32) uint8
        cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
        sets = [load(cls, train=train) for train in (True, False)]
        train, test = (
            Images(torch.from_numpy(d.data.transpose(0, 3, 1, 2).copy()), torch.tensor(d.targets))
            for d in sets
        )
        return train, test, len(sets[0].classes)
    folder = Path(name)
    if not (folder / "train").is_dir():
        raise FileNotFoundError(f"{folder} has no train/ folder (ImageFolder layout expected)")
    try:
        splits = [
            tvd.ImageFolder(str(folder / s)) for s in ("train", "val") if (folder / s).is_dir()
        ]
    except FileNotFoundError as e:  # no class folders, or no images in them
        raise FileNotFoundError(f"{folder} is empty or not in ImageFolder layout: {e}") from e
    if len(splits) == 2 and splits[1].classes != splits[0].classes:
        raise FileNotFoundError(f"{folder}/val has other classes than {folder}/train")
    train, *val = (Images([s for s, _ in d.samples], torch.tensor(d.targets)) for d in splits)
    return train, (val[0] if val else train), len(splits[0].classes)


def knn_split(
    train: Images, val: Images, *, bank: int, queries: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kNN monitor's images: indices of ``bank`` images into ``train`` and of ``queries``
    into ``val``, uniform from ``seed`` (ImageFolder lists files class by class) and sorted
    (files in folder order). If ``val is train``, the queries are at most half of it and the
    bank is drawn from the rest: no query is its own neighbour. The bank holds labelled images
    only (STL-10's unlabeled split has label -1)."""
    g = torch.Generator().manual_seed(seed)
    if val is train:
        order = torch.randperm(len(train), generator=g)
        n = min(queries, len(train) // 2)
        chosen_bank, chosen_queries = order[n : n + bank], order[:n]
    else:
        labelled = (train.labels >= 0).nonzero().flatten()
        chosen_bank = labelled[torch.randperm(len(labelled), generator=g)[:bank]]
        chosen_queries = torch.randperm(len(val), generator=g)[:queries]
    return chosen_bank.sort().values, chosen_queries.sort().values


# ---- Loading
def view_seed(*key: int) -> int:
    """A 63-bit seed hashed from ``key``, e.g. (seed, epoch, position in the epoch)."""
    digest = hashlib.blake2b("/".join(map(str, key)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def epoch_batches(
    n: int,
    batch: int,
    *,
    seed: int,
    epoch: int,
    start: int = 0,
    rank: int = 0,
    world: int = 1,
    view_seeds: bool = False,
) -> list[list[Any]]:
    """Rank ``rank``'s batches (of ``batch`` indices into ``n`` images) of the permutation fixed
    by (seed, epoch), from batch ``start`` on: a resume replays exactly the batches not trained
    yet, and a step covers the same images under any number of processes. ``view_seeds``:
    (index, seed of its views) pairs, the seed a function of (seed, epoch, position)."""
    steps = n // (batch * world)
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=g)[: steps * world * batch].view(steps, world, batch)
    place = torch.arange(steps * world * batch).view(steps, world, batch)
    batches = []
    for step in range(start, steps):
        pairs = zip(order[step, rank].tolist(), place[step, rank].tolist(), strict=True)
        batches.append([(i, view_seed(seed, epoch, p)) if view_seeds else i for i, p in pairs])
    return batches


def collate(batch: list[tuple[Any, torch.Tensor]]) -> tuple[Any, torch.Tensor]:
    """Stack the images (a list when their sizes differ) or the two views, and the labels."""
    items, labels = zip(*batch, strict=True)
    if isinstance(items[0], tuple):  # two views per image
        return tuple(torch.stack(v) for v in zip(*items, strict=True)), torch.stack(labels)
    same = all(i.shape == items[0].shape for i in items)
    return (torch.stack(items) if same else list(items)), torch.stack(labels)


def loader(
    data: Images, batches: int | list[list[Any]], *, workers: int, seed: int, pin: bool = False
) -> torch.utils.data.DataLoader:  # type: ignore[type-arg]
    """A batch size (every image in order) or the batches to read. Images in memory without a
    transform are read in this process; files and CPU augmentation by ``workers`` processes."""
    in_memory = isinstance(data.items, torch.Tensor) and data.transform is None
    sampling = {"batch_size": batches} if isinstance(batches, int) else {"batch_sampler": batches}
    return torch.utils.data.DataLoader(
        data,
        **sampling,
        num_workers=0 if in_memory else workers,
        collate_fn=collate,
        pin_memory=pin,
        generator=torch.Generator().manual_seed(seed),  # leaves the global stream alone
    )


def evaluation_batches(
    data: Images, image_size: int, device: torch.device, *, workers: int = 0, seed: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every image of ``data`` in order: image files as the reference evaluates ImageNet
    (Resize(256) and CenterCrop(224) at 224 px: the shorter side resized to ``image_size``
    x 256/224, the center ``image_size`` px square cut out); the built-in data sets, stored
    at one square size, resized to ``image_size`` (CIFAR at 32 px as it is, as the authors'
    CIFAR demo). Normalised with ImageNet's statistics: ``(N, 3, image_size, image_size)``
    floats and ``(N,)`` labels."""
    from torchvision.transforms.v2 import functional as F

    mean = torch.tensor((0.485, 0.456, 0.406), device=device).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225), device=device).view(1, 3, 1, 1)
    shorter, files = round(image_size * 256 / 224), isinstance(data.items, list)
    for images, labels in loader(Images(data.items, data.labels), 256, workers=workers, seed=seed):
        views = []
        for image in images:  # (3, H, W) uint8, of any size
            image = image.to(device)
            if files:
                image = F.center_crop(F.resize(image, [shorter], antialias=True), [image_size])
            elif image.shape[1:] != (image_size, image_size):
                image = F.resize(image, [image_size, image_size], antialias=True)
            views.append(image)
        yield (torch.stack(views).float() / 255 - mean) / std, labels.to(device)


def to_device(batch: Any, device: torch.device) -> Any:
    """A tensor, or a list or tuple of them (images of different sizes, two views), moved."""
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(x, device) for x in batch)
    return batch.to(device, non_blocking=True)
