"""Weighted kNN against a brute-force loop."""

from __future__ import annotations

import math

import pytest
import torch

from momentum_contrast.knn import embed_dataset, knn_predict


def test_matches_a_brute_force_vote() -> None:
    g = torch.Generator().manual_seed(0)
    bank, labels = torch.randn(50, 8, generator=g), torch.randint(0, 4, (50,), generator=g)
    queries = torch.randn(7, 8, generator=g)
    scores = knn_predict(queries, bank, labels, 4, k=10, temperature=0.2)
    for i, q in enumerate(queries):
        sims = [float(q @ b / (q.norm() * b.norm())) for b in bank]
        top = sorted(range(50), key=lambda j: -sims[j])[:10]
        expected = [0.0] * 4
        for j in top:
            expected[int(labels[j])] += math.exp(sims[j] / 0.2)
        torch.testing.assert_close(scores[i], torch.tensor(expected), rtol=1e-5, atol=0)


def test_k_larger_than_bank_and_separable_clusters() -> None:
    centres = torch.eye(3) * 5
    g = torch.Generator().manual_seed(1)
    bank = centres.repeat(10, 1) + 0.1 * torch.randn(30, 3, generator=g)  # 10 per class
    labels = torch.arange(3).repeat(10)
    queries = centres + 0.05
    pred = knn_predict(queries, bank, labels, 3, k=500).argmax(1)
    assert torch.equal(pred, torch.arange(3))


def test_embed_dataset_and_bad_input() -> None:
    data = [(torch.randn(3, 2), torch.tensor([0, 1, 2])), (torch.randn(2, 2), torch.tensor([1, 1]))]
    feats, labels = embed_dataset(torch.nn.Identity(), data)
    assert feats.shape == (5, 2) and torch.equal(labels, torch.tensor([0, 1, 2, 1, 1]))
    with pytest.raises(ValueError, match=r"bank_labels must be an integer tensor of shape \(5,\)"):
        knn_predict(feats, feats, labels.float(), 3)
    with pytest.raises(ValueError, match="bank must have 2 columns"):
        knn_predict(feats, torch.randn(4, 3), torch.zeros(4, dtype=torch.long), 3)
