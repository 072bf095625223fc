"""Regressions from an adversarial pass: each once gave a silently wrong result or an
unclear crash."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from momentum_contrast import MomentumEncoder, symmetric_contrastive_loss
from momentum_contrast.distributed import batch_shuffle, batch_unshuffle, concat_all_gather


def test_half_precision_tensor_momentum_is_refused() -> None:
    enc = MomentumEncoder(nn.Linear(3, 3))
    for dtype in (torch.bfloat16, torch.float16):  # bfloat16(0.999) == 1.0: no update
        with pytest.raises(TypeError, match="float32 or float64 tensor"):
            enc.update(torch.tensor(0.999, dtype=dtype))


def test_unshuffled_keys_swapped_through_data_are_gathered_anew() -> None:
    x = torch.randn(6, 4)
    shuffled, idx = batch_shuffle(x)
    keys = batch_unshuffle(shuffled * 2, idx)
    keys.data = torch.full((6, 4), 7.0)  # same tensor object, other memory
    assert torch.equal(concat_all_gather(keys), torch.full((6, 4), 7.0))


def test_unshuffled_keys_edited_in_place_are_gathered_anew() -> None:
    x = torch.randn(6, 4)
    shuffled, idx = batch_shuffle(x)
    keys = batch_unshuffle(shuffled, idx)
    keys.mul_(-1)
    assert torch.equal(concat_all_gather(keys), -x)


def test_batch_unshuffle_under_inference_mode() -> None:
    x = torch.randn(6, 4)
    with torch.inference_mode():
        shuffled, idx = batch_shuffle(x)
        keys = batch_unshuffle(shuffled + 1, idx)
        assert torch.equal(concat_all_gather(keys), x + 1)


def test_symmetric_loss_computes_in_float64_when_any_input_is() -> None:
    g = torch.Generator().manual_seed(0)
    q1, k1, k2 = (torch.randn(4, 8, generator=g) for _ in range(3))
    q2 = torch.randn(4, 8, generator=g, dtype=torch.float64)
    assert symmetric_contrastive_loss(q1, q2, k1, k2).dtype == torch.float64


def test_symmetric_loss_offsets_and_temperatures() -> None:
    q, k = torch.randn(2, 8), torch.randn(6, 8)
    by_numpy = symmetric_contrastive_loss(q, q, k, k, positive_offset=np.int64(3))
    assert torch.equal(by_numpy, symmetric_contrastive_loss(q, q, k, k, positive_offset=3))
    with pytest.raises(ValueError, match="at least as many rows as q1"):
        symmetric_contrastive_loss(k, k, q, q, positive_offset=0)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0, got inf"):
        symmetric_contrastive_loss(q, q, q, q, temperature=float("inf"))
