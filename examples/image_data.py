"""Data for the example scripts: decoding, datasets, the epoch sampler and the loader.

Images are decoded to uint8 RGB always (16-bit PNGs are scaled down, see
[`to_uint8`][]); a file that cannot be decoded raises an error naming it. With
``--augment-on cpu`` each sample's two views are drawn from a generator seeded by
``(seed, epoch, position in the epoch)``, so they do not depend on which worker made them,
differ from epoch to epoch, and are the same again when a run resumes mid-epoch.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from shapes import make_shapes


class DecodeError(RuntimeError):
    """An image file that could not be read or decoded (the message names the file)."""


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """uint8 pixels from uint8 or uint16 ones; 16-bit values are scaled by 255 / 65535 and
    rounded to nearest (``(x * 255 + 32767) // 65535``), so 0 -> 0, 65535 -> 255, and a
    16-bit value ``257 * v`` (8-bit ``v`` widened) -> ``v`` exactly."""
    if image.dtype == torch.uint8:
        return image
    if image.dtype == torch.uint16:
        return ((image.to(torch.int32) * 255 + 32767) // 65535).to(torch.uint8)
    raise TypeError(f"cannot convert {image.dtype} pixels to uint8")


@functools.cache
def image_decoder() -> Callable[[str], torch.Tensor]:
    """``path -> (3, H, W)`` RGB pixels (uint16 for 16-bit PNGs): TorchCodec's decoder
    (pip install torchcodec; it supersedes torchvision's since torchvision 0.29), else
    torchvision's."""
    try:
        from torchcodec.decoders import decode_image
    except ImportError:
        import torchvision  # imported where needed: it takes a second

        def with_torchvision(path: str) -> torch.Tensor:
            with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders for
                # TorchCodec's, which is not installed here: the warning says only that
                warnings.filterwarnings("ignore", ".*superseded.*TorchCodec", DeprecationWarning)
                return torchvision.io.decode_image(path, mode=torchvision.io.ImageReadMode.RGB)

        return with_torchvision
    return lambda path: decode_image(path, mode="RGB", output_dtype="auto")


def decode(path: str) -> torch.Tensor:
    """``(3, H, W)`` uint8 RGB from an image file; :class:`DecodeError` naming ``path``."""
    try:
        image = image_decoder()(path)
    except (RuntimeError, ValueError, OSError) as e:
        raise DecodeError(f"cannot decode image file {path}: {e}") from e
    return to_uint8(image)


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """Seed of one sample's CPU augmentation: a hash of (seed, epoch, position), where
    position is the sample's place in the epoch's global order (step * batch + rank * batch
    per process + index in the batch). The hash also spreads seeds over the low 32 bits,
    which are all that ``torch.Generator.manual_seed`` uses on the CPU."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class Images(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """uint8 images in memory (shapes) or files on disk (ImageFolder), as (C, H, W) tensors.

    Indexed by ``i`` or by ``(i, seed)``: with a ``transform`` (CPU augmentation), the seed
    makes the sample's two views (see [`sample_seed`][])."""

    def __init__(self, items: Any, labels: torch.Tensor, transform: Any = None) -> None:
        self.items, self.labels, self.transform = items, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: torch.Tensor) -> Images:
        """The images at ``indices`` (a 1-d long tensor), in that order."""
        if isinstance(self.items, torch.Tensor):
            items: Any = self.items[indices]
        else:
            items = [self.items[i] for i in indices.tolist()]
        return Images(items, self.labels[indices], self.transform)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Any, int]:
        i, seed = key if isinstance(key, tuple) else (key, None)
        item = self.items[i]
        if isinstance(item, str):
            item = decode(item)
        if self.transform is not None:  # CPU augmentation: two views made in the worker
            g = None if seed is None else torch.Generator().manual_seed(seed)
            item = tuple(v[0] for v in self.transform(item[None], generator=g))
        return item, int(self.labels[i])


TORCHVISION_SETS = ("cifar10", "cifar100", "stl10")


def torchvision_set(args: argparse.Namespace, labelled_only: bool) -> tuple[Images, Images, int]:
    """CIFAR-10/100 (train, test) or STL-10 (``unlabeled`` + ``train`` for pre-training, label
    -1 for the unlabeled images, or ``train`` alone; ``test``) from ``--data-root``: an
    existing copy, else downloaded there (when the network allows)."""
    import torchvision.datasets as tvd

    def load(cls: Any, **split: Any) -> Any:
        try:
            return cls(args.data_root, download=False, **split)
        except RuntimeError:  # not there (or damaged): try to download it
            try:
                return cls(args.data_root, download=True, **split)
            except Exception as e:  # no network: say where the files should be
                sys.exit(
                    f"error: --data {args.data}: no copy under --data-root {args.data_root} "
                    f"and the download failed ({type(e).__name__}: {e})"
                )

    if args.data == "stl10":
        train = load(tvd.STL10, split="train" if labelled_only else "train+unlabeled")
        test = load(tvd.STL10, split="test")
        as_images = lambda d: Images(torch.from_numpy(d.data), torch.from_numpy(d.labels).long())  # noqa: E731
        return as_images(train), as_images(test), 10
    cls, classes = (tvd.CIFAR10, 10) if args.data == "cifar10" else (tvd.CIFAR100, 100)
    train, test = load(cls, train=True), load(cls, train=False)
    as_images = lambda d: Images(  # noqa: E731
        torch.from_numpy(d.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(d.targets)
    )  # (N, 32, 32, 3) uint8 -> (N, 3, 32, 32)
    return as_images(train), as_images(test), classes


def datasets(args: argparse.Namespace, labelled_only: bool = False) -> tuple[Images, Images, int]:
    """(train, held-out, number of classes) for --data. Without a val/ folder the held-out
    split *is* the training set (the same object): callers must keep the two apart.
    ``labelled_only``: STL-10 without its unlabeled split (linear evaluation)."""
    if args.data == "shapes":
        x, y = make_shapes(args.shapes_train + args.shapes_val, args.image_size, seed=1234)
        n = args.shapes_train
        return Images(x[:n], y[:n]), Images(x[n:], y[n:]), 10
    if args.data in TORCHVISION_SETS:
        return torchvision_set(args, labelled_only)
    import torchvision

    root = Path(args.data)
    if not (root / "train").is_dir():
        sys.exit(f"error: --data {root} has no train/ folder (ImageFolder layout expected)")
    try:
        train = torchvision.datasets.ImageFolder(str(root / "train"))
        has_val = (root / "val").is_dir()
        val = torchvision.datasets.ImageFolder(str(root / "val")) if has_val else None
    except FileNotFoundError as e:  # no class folders, or no images in them
        sys.exit(f"error: {root} is empty or not in ImageFolder layout: {e}")
    if val is not None and val.classes != train.classes:
        sys.exit(f"error: {root}/val has other classes than {root}/train")
    as_images = lambda d: Images([s for s, _ in d.samples], torch.tensor(d.targets))  # noqa: E731
    train_images = as_images(train)
    return train_images, (train_images if val is None else as_images(val)), len(train.classes)


class EpochSampler(torch.utils.data.Sampler):  # type: ignore[type-arg]
    """This rank's share of a permutation fixed by (seed, epoch), from batch ``start`` on:
    resuming mid-epoch replays exactly the batches that were not trained yet. Every step
    covers the same images whatever the number of processes. With ``seeds``, yields
    ``(index, sample_seed)`` pairs for the CPU augmentation."""

    def __init__(
        self,
        n: int,
        batch: int,
        seed: int,
        epoch: int,
        start: int,
        rank: int,
        world: int,
        seeds: bool = False,
    ):
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        steps = n // (batch * world)
        perm = torch.randperm(n, generator=g)[: steps * batch * world].view(steps, world, batch)
        self.indices: list[Any] = perm[start:, rank].flatten().tolist()
        if seeds:
            where = torch.arange(steps * world * batch).view(steps, world, batch)
            positions = where[start:, rank].flatten().tolist()
            pairs = zip(self.indices, positions, strict=True)
            self.indices = [(i, sample_seed(seed, epoch, p)) for i, p in pairs]

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Any:
        return iter(self.indices)


def collate(batch: list[tuple[Any, int]]) -> tuple[Any, torch.Tensor]:
    """Stack the images (a list when their sizes differ) or the CPU-augmented views."""
    items, labels = zip(*batch, strict=True)
    if isinstance(items[0], tuple):  # CPU-augmented pairs of views
        return tuple(torch.stack(v) for v in zip(*items, strict=True)), torch.tensor(labels)
    same = all(i.shape == items[0].shape for i in items)
    return (torch.stack(items) if same else list(items)), torch.tensor(labels)


def loader(data: Images, args: argparse.Namespace, batch: int, **sampler_args: Any) -> Any:
    """Batches of ``data``: training batches from an [`EpochSampler`][] when
    ``sampler_args`` (epoch, start, rank, world) are given, else all images in order.
    Images held in memory with nothing to do per image are loaded without workers."""
    in_memory = isinstance(data.items, torch.Tensor) and data.transform is None
    sampler = None
    if sampler_args:
        seeds = data.transform is not None
        sampler = EpochSampler(len(data), batch, args.seed, seeds=seeds, **sampler_args)
    return torch.utils.data.DataLoader(
        data,
        batch_size=batch,
        sampler=sampler,
        num_workers=0 if in_memory else args.workers,
        collate_fn=collate,
        pin_memory=args.device.startswith("cuda"),
        drop_last=sampler is not None,
        generator=torch.Generator().manual_seed(args.seed),  # leaves the global RNG alone
    )


def to_device(x: Any, device: torch.device) -> Any:
    """Move a tensor, or a list or tuple of them, to ``device``."""
    if isinstance(x, (list, tuple)):
        return type(x)(to_device(v, device) for v in x)
    return x.to(device, non_blocking=True)
