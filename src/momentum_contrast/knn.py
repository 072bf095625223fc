"""Weighted k-nearest-neighbour monitor of self-supervised features (as MoCo's demo)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from momentum_contrast._checks import (
    check_float_matrix,
    check_positive,
    check_positive_int,
    check_same_device,
    is_integer,
)

__all__ = ["embed_dataset", "knn_predict"]


def knn_predict(
    features: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    *,
    k: int = 200,
    temperature: float = 0.1,
) -> torch.Tensor:
    """Class scores from the ``k`` most similar bank entries, weighted ``exp(sim / T)``.

    Each row's weights are divided by its largest one, ``exp(max sim / T)``: the same
    prediction as the reference's, without overflow (``exp(1 / 0.01)`` is ``inf`` in float32,
    which made every class tie).

    Args:
        features: ``(N, D)`` float query features (L2-normalised inside).
        bank: ``(M, D)`` float features of the labelled reference set (normalised inside),
            on the device of ``features``, ``M >= 1``.
        bank_labels: ``(M,)`` integer labels (any integer dtype but bool) in
            ``[0, num_classes)``, on the device of ``features``.
        num_classes: number of classes ``C``.
        k: neighbours (200 as the reference; capped at ``M``). Keyword-only, as
            ``temperature``: ``num_classes`` and ``k`` swapped would run.
        temperature: ``T`` of the weights (0.1 as the reference).

    Returns:
        ``(N, C)`` float32 scores in ``[0, k]`` (the nearest neighbour weighs 1);
        ``scores.argmax(1)`` is the prediction. A NaN in ``bank`` is among every query's
        neighbours and makes every score NaN (every prediction class 0), a NaN in a
        query that query's: values are not read (see Raises).

    Raises:
        TypeError: a tensor of the wrong kind (``bank_labels`` float, bool or complex).
        ValueError: shapes or devices that do not match; labels outside
            ``[0, num_classes)`` when ``bank_labels`` is on the CPU. The label *values*
            are checked only there: on an accelerator, reading them back would stall the
            host until the device catches up, which this library never does; an
            out-of-range label then fails inside ``scatter_add_`` (a device-side assert
            on CUDA).

    Examples:
        >>> import torch
        >>> from momentum_contrast.knn import knn_predict
        >>> bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
        >>> labels = torch.tensor([0, 0, 1])
        >>> knn_predict(torch.tensor([[1.0, 0.05]]), bank, labels, 2, k=2).argmax(1)
        tensor([0])
    """
    check_float_matrix("features", features)
    check_float_matrix("bank", bank, features.shape[1], "the features' width")
    check_same_device("bank", bank, "features", features)
    if bank.shape[0] == 0 or features.shape[1] == 0:  # every score 0: every prediction class 0
        raise ValueError(
            "bank must hold at least one row and features at least one column, got shapes "
            f"{tuple(bank.shape)} and {tuple(features.shape)}"
        )
    classes = check_positive_int("num_classes", num_classes)
    _check_labels(bank_labels, bank.shape[0], classes)
    check_same_device("bank_labels", bank_labels, "features", features)
    k = min(check_positive_int("k", k), bank.shape[0])
    t = check_positive("temperature", temperature)
    sim = F.normalize(features.float(), dim=1) @ F.normalize(bank.float(), dim=1).T  # (N, M)
    top_sim, top_idx = sim.topk(k, dim=1)  # (N, k)
    weights = ((top_sim - top_sim[:, :1]) / t).exp()  # (N, k), divided by the row's largest
    scores = torch.zeros(features.shape[0], classes, device=features.device)
    return scores.scatter_add_(1, bank_labels[top_idx].long(), weights)


def _check_labels(labels: object, rows: int, classes: int) -> None:
    """``(rows,)`` integer labels; their values in ``[0, classes)`` where reading is free."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"bank_labels must be a torch.Tensor, got {type(labels).__name__}")
    if not is_integer(labels):
        raise TypeError(
            f"bank_labels must have an integer dtype (e.g. torch.int64), got {labels.dtype}"
        )
    if labels.shape != (rows,):
        raise ValueError(
            f"bank_labels must have shape ({rows},), one label per bank row, "
            f"got {tuple(labels.shape)}"
        )
    if labels.device.type == "cpu" and rows > 0:  # host memory: no device to wait for
        low, high = (int(v) for v in torch.aminmax(labels.long()))
        if low < 0 or high >= classes:
            raise ValueError(
                f"bank_labels must be in [0, num_classes={classes}), got values in [{low}, {high}]"
            )


@torch.no_grad()
def embed_dataset(
    model: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device | str | int = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` over ``(images, labels)`` batches; return the features and labels.

    ``model`` runs as given: for frozen features call ``model.eval()`` first (in training
    mode a BatchNorm normalises each batch by itself and updates its running statistics).

    Args:
        model: maps ``(N, ...)`` images to ``(N, D)`` features, on ``device``.
        batches: yields ``(images, labels)`` pairs of tensors, ``(N, ...)`` and ``(N,)``
            (a ``DataLoader``); at least one.
        device: where the images go and the results are; copies to a GPU do not make the
            host wait, copies into host memory do (the host reads them next).

    Returns:
        ``(features (M, D), labels (M,))``, on ``device``.

    Raises:
        TypeError: a batch that is not a pair of tensors, or a ``device`` that is not a
            ``torch.device``, a str or an int.
        ValueError: no batch, or features that are not ``(N, D)`` with one label per row.

    Examples:
        >>> import torch
        >>> from momentum_contrast.knn import embed_dataset
        >>> data = [(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))]
        >>> feats, labels = embed_dataset(torch.nn.Linear(3, 2), data)
        >>> feats.shape, labels.shape
        (torch.Size([4, 2]), torch.Size([4]))
    """
    if isinstance(device, bool) or not isinstance(device, (torch.device, str, int)):
        raise TypeError(
            f"device must be a torch.device, a str or a GPU index, got {type(device).__name__}"
        )
    device = torch.device(device)
    wait = device.type == "cpu"  # the host reads what reaches its memory: wait for the copy
    feats, labels = [], []
    for i, batch in enumerate(batches):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:  # a tensor's rows unpack
            raise TypeError(
                "batches must yield (images, labels) pairs (tuples or lists), got "
                f"{type(batch).__name__} {batch!r:.50} at batch {i}"
            )
        images, y = batch
        if not isinstance(images, torch.Tensor) or not isinstance(y, torch.Tensor):
            got = f"({type(images).__name__}, {type(y).__name__})"
            raise TypeError(f"batches must yield pairs of tensors, got {got} at batch {i}")
        out = model(images.to(device, non_blocking=not wait))
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or y.shape != out.shape[:1]:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                "model must give (N, D) features and batches (N,) labels, one per image; got "
                f"features {got} and labels {tuple(y.shape)} at batch {i}"
            )
        feats.append(out.float())
        labels.append(y.to(device, non_blocking=not wait))
    if not feats:
        raise ValueError("batches must yield at least one (images, labels) pair, got none")
    return torch.cat(feats), torch.cat(labels)
