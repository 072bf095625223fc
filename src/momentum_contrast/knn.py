"""Weighted k-nearest-neighbour monitor of self-supervised features (as MoCo's demo)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from momentum_contrast._checks import check_float_matrix, check_positive, check_positive_int

__all__ = ["embed_dataset", "knn_predict"]


def knn_predict(
    features: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
) -> torch.Tensor:
    """Class scores from the ``k`` most similar bank entries, weighted ``exp(sim / T)``.

    Args:
        features: ``(N, D)`` query features (L2-normalised inside).
        bank: ``(M, D)`` features of the labelled reference set (normalised inside).
        bank_labels: ``(M,)`` integer labels in ``[0, num_classes)``.
        num_classes: number of classes ``C``.
        k: neighbours (200 as the reference; capped at ``M``).
        temperature: ``T`` of the weights (0.1 as the reference).

    Returns:
        ``(N, C)`` scores; ``scores.argmax(1)`` is the prediction.

    Examples:
        >>> import torch
        >>> from momentum_contrast.knn import knn_predict
        >>> bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
        >>> labels = torch.tensor([0, 0, 1])
        >>> knn_predict(torch.tensor([[1.0, 0.05]]), bank, labels, 2, k=2).argmax(1)
        tensor([0])
    """
    check_float_matrix("features", features)
    check_float_matrix("bank", bank, features.shape[1])
    if bank_labels.shape != (bank.shape[0],) or bank_labels.is_floating_point():
        raise ValueError(
            f"bank_labels must be an integer tensor of shape ({bank.shape[0]},), "
            f"got {bank_labels.dtype} {tuple(bank_labels.shape)}"
        )
    classes = check_positive_int("num_classes", num_classes)
    k = min(check_positive_int("k", k), bank.shape[0])
    t = check_positive("temperature", temperature)
    sim = F.normalize(features.float(), dim=1) @ F.normalize(bank.float(), dim=1).T  # (N, M)
    top_sim, top_idx = sim.topk(k, dim=1)  # (N, k)
    weights = (top_sim / t).exp()
    scores = torch.zeros(features.shape[0], classes, device=features.device)
    return scores.scatter_add_(1, bank_labels[top_idx], weights)


@torch.no_grad()
def embed_dataset(
    model: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` over ``(images, labels)`` batches; return the features and labels.

    Returns:
        ``(features (M, D), labels (M,))``, on ``device``.

    Examples:
        >>> import torch
        >>> from momentum_contrast.knn import embed_dataset
        >>> data = [(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))]
        >>> feats, labels = embed_dataset(torch.nn.Linear(3, 2), data)
        >>> feats.shape, labels.shape
        (torch.Size([4, 2]), torch.Size([4]))
    """
    feats, labels = [], []
    for images, y in batches:
        feats.append(model(images.to(device, non_blocking=True)).float())
        labels.append(y.to(device, non_blocking=True))
    return torch.cat(feats), torch.cat(labels)
