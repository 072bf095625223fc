"""Gradient accumulation, on one process and on two gloo ranks (float64, LayerNorm model):
the micro-batches of a window give the full batch's loss, gradients and queue.

MoCo v1/v2: one queue snapshot for the window, the keys of the window pushed once after
it. MoCo v3: the keys of the whole batch first, each micro-batch scored against all of
them with ``positive_offset``. The references below are the full-batch losses written
out from the papers, not the library's functions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from _dist_scaling import (
    BATCH,
    QUEUE,
    T_V2,
    T_V3,
    initial_queue,
    ln_model,
    rank_batch,
    scenario_accumulate_v2,
    scenario_accumulate_v3,
)
from _dist_workers import launch

from momentum_contrast import symmetric_contrastive_loss


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


def run(scenario: Any, world: int, tmp: Path) -> list[dict[str, Any]]:
    return [scenario()] if world == 1 else launch(scenario, world, tmp)


def reference_grads(loss: torch.Tensor, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    names = [n for n, _ in model.named_parameters()]
    return dict(zip(names, torch.autograd.grad(loss, list(model.parameters())), strict=True))


@pytest.mark.parametrize("world", [1, 2])
def test_v2_micro_batches_equal_the_full_batch(world: int, tmp_path: Path) -> None:
    ranks = run(scenario_accumulate_v2, world, tmp_path)
    queue, all_keys = initial_queue(), []
    for r, result in enumerate(ranks):
        model = ln_model()
        q, k = unit(model(rank_batch(20, r))), unit(model(rank_batch(21, r)).detach())
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ initial_queue().T], 1) / T_V2
        full = (torch.logsumexp(logits, 1) - logits[:, 0]).mean()  # one full-batch step
        torch.testing.assert_close(result["loss"], full.detach(), rtol=0, atol=1e-12)
        for name, grad in reference_grads(full, model).items():
            torch.testing.assert_close(result["grads"][name], grad, rtol=0, atol=1e-12)
        all_keys.append(k)
    for i, key in enumerate(torch.cat(all_keys)):  # the full batch's push, in rank order
        queue[i % QUEUE] = key
    for result in ranks:
        torch.testing.assert_close(result["queue"], queue, rtol=0, atol=1e-15)
        assert int(result["ptr"]) == world * BATCH


@pytest.mark.parametrize("world", [1, 2])
def test_v3_micro_batches_against_all_keys_equal_the_full_batch(world: int, tmp_path: Path) -> None:
    ranks = run(scenario_accumulate_v3, world, tmp_path)
    model = ln_model()
    k1 = torch.cat([model(rank_batch(22, r)) for r in range(world)]).detach()
    k2 = torch.cat([model(rank_batch(23, r)) for r in range(world)]).detach()
    for r, result in enumerate(ranks):
        model = ln_model()
        q1, q2 = model(rank_batch(22, r)), model(rank_batch(23, r))
        own = torch.arange(BATCH) + r * BATCH

        def ctr(q: torch.Tensor, k: torch.Tensor, own: torch.Tensor = own) -> torch.Tensor:
            logits = unit(q) @ unit(k).T / T_V3
            return (torch.logsumexp(logits, 1) - logits[torch.arange(len(q)), own]).mean() * (
                2 * T_V3
            )

        full = ctr(q1, k2) + ctr(q2, k1)
        torch.testing.assert_close(result["loss"], full.detach(), rtol=0, atol=1e-12)
        for name, grad in reference_grads(full, model).items():
            torch.testing.assert_close(result["grads"][name], grad, rtol=0, atol=1e-12)


def test_positive_offset_is_validated() -> None:
    q, k = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match=r"k1 must have the same shape as q1 \(4, 8\)"):
        symmetric_contrastive_loss(q, q, k, k)  # more keys than queries needs the offset
    with pytest.raises(ValueError, match=r"positive_offset must be in \[0, M - N\] = \[0, 6\]"):
        symmetric_contrastive_loss(q, q, k, k, positive_offset=7)
    with pytest.raises(ValueError, match=r"\[0, 6\] \(M = 10 keys, N = 4 queries\), got -1"):
        symmetric_contrastive_loss(q, q, k, k, positive_offset=-1)
    with pytest.raises(TypeError, match=r"positive_offset must be an int or None, got Tensor"):
        symmetric_contrastive_loss(q, q, k, k, positive_offset=torch.tensor(2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"k2 must have the same shape as k1 \(10, 8\)"):
        symmetric_contrastive_loss(q, q, k, k[:9], positive_offset=0)
    with pytest.raises(ValueError, match=r"k1 must have 8 columns"):
        symmetric_contrastive_loss(q, q, k[:, :4], k[:, :4], positive_offset=0)
