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
        largest = math.exp(sims[top[0]] / 0.2)  # each row's weights divided by its largest
        torch.testing.assert_close(scores[i] * largest, torch.tensor(expected), rtol=1e-5, atol=0)


def test_a_small_temperature_does_not_overflow() -> None:
    """exp(1 / 0.01) is inf in float32: every class scored inf and argmax said class 0."""
    bank, labels = torch.tensor([[1.0, 0.0], [0.95, 0.31]]), torch.tensor([1, 0])
    for t in (0.1, 0.01, 1e-4):
        scores = knn_predict(torch.tensor([[1.0, 0.0]]), bank, labels, 2, k=2, temperature=t)
        assert torch.isfinite(scores).all() and scores.argmax(1).tolist() == [1], (t, scores)
    with pytest.raises(ValueError, match="bank must hold at least one row"):
        knn_predict(torch.randn(3, 2), torch.randn(0, 2), torch.zeros(0, dtype=torch.long), 2)


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
    with pytest.raises(ValueError, match="bank must have 2 columns"):
        knn_predict(feats, torch.randn(4, 3), torch.zeros(4, dtype=torch.long), 3)
    unlabelled_batches = ([torch.randn(2, 3)], [(torch.randn(2, 2),)], [{"image": 0, "label": 1}])
    for unlabelled in unlabelled_batches:  # a batch of 2 rows, a dict of 2 keys: unpacked
        with pytest.raises(
            TypeError, match=r"\(images, labels\) pairs .*, got (Tensor|tuple|dict)"
        ):
            embed_dataset(torch.nn.Identity(), unlabelled)  # type: ignore[arg-type]


def test_embed_dataset_refuses_what_would_misalign_labels() -> None:
    """Labels of another count, (N, 1) labels, 4-D features, no batch, list labels and a
    dtype for ``device`` were taken (or gave errors that named nothing)."""
    x = torch.randn(3, 2)
    cases: list[tuple[object, object, type[Exception], str]] = [
        ([(x, torch.tensor([0, 1]))], "cpu", ValueError, r"features \(3, 2\) and labels \(2,\)"),
        ([(x, torch.zeros(3, 1))], "cpu", ValueError, r"labels \(3, 1\) at batch 0"),
        ([(x.view(3, 2, 1, 1), torch.zeros(3))], "cpu", ValueError, r"features \(3, 2, 1, 1\)"),
        ([], "cpu", ValueError, "at least one"),
        ([(x, [0, 1, 2])], "cpu", TypeError, r"pairs of tensors, got \(Tensor, list\) at batch 0"),
        ([(x, torch.zeros(3))], torch.float64, TypeError, "device must be a torch.device, a s"),
        ([(x, torch.zeros(3))], True, TypeError, "device must be a torch.device, a str or a GPU"),
    ]
    for batches, device, error, message in cases:
        with pytest.raises(error, match=message):
            embed_dataset(torch.nn.Identity(), batches, device)  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
def test_any_integer_label_dtype_gives_the_same_scores(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    bank, labels = torch.randn(20, 4, generator=g), torch.randint(0, 5, (20,), generator=g)
    queries = torch.randn(6, 4, generator=g)
    want = knn_predict(queries, bank, labels, 5, k=7)
    assert torch.equal(knn_predict(queries, bank, labels.to(dtype), 5, k=7), want)


@pytest.mark.parametrize(
    ("labels", "error", "fragments"),
    [
        (torch.zeros(5), TypeError, ["bank_labels", "integer dtype", "torch.float32"]),
        (torch.zeros(5, dtype=torch.bool), TypeError, ["bank_labels", "torch.bool"]),
        (torch.zeros(5, dtype=torch.complex64), TypeError, ["bank_labels", "torch.complex64"]),
        ([0, 1, 2, 0, 1], TypeError, ["bank_labels", "torch.Tensor", "list"]),
        (torch.zeros(4, dtype=torch.long), ValueError, ["bank_labels", "(5,)", "(4,)"]),
        (torch.zeros(5, 1, dtype=torch.long), ValueError, ["bank_labels", "(5,)", "(5, 1)"]),
        (torch.tensor([0, 1, 3, 0, 1]), ValueError, ["num_classes=3", "[0, 3]"]),
        (torch.tensor([0, -1, 2, 0, 1]), ValueError, ["[0, num_classes=3)", "[-1, 2]"]),
        (torch.zeros(5, dtype=torch.long, device="meta"), ValueError, ["bank_labels", "meta"]),
    ],
    ids=["float", "bool", "complex", "list", "short", "2-D", "too-high", "negative", "device"],
)
def test_bad_bank_labels_are_reported(labels, error, fragments) -> None:  # type: ignore[no-untyped-def]
    feats = torch.randn(5, 2)
    with pytest.raises(error) as info:
        knn_predict(feats, feats, labels, 3)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_bank_on_another_device_is_reported() -> None:
    with pytest.raises(ValueError, match="bank must be on the device of features, cpu, got meta"):
        knn_predict(torch.randn(3, 2), torch.empty(4, 2, device="meta"), torch.zeros(4), 2)


def test_k_and_temperature_are_keyword_only() -> None:
    """``knn_predict(f, bank, labels, 200, 10)``, meant as 10 classes and k 200, ran with
    200 classes and k 10."""
    f, labels = torch.randn(4, 3), torch.zeros(4, dtype=torch.long)
    with pytest.raises(TypeError, match="positional argument"):
        knn_predict(f, f, labels, 200, 10)  # type: ignore[misc]
