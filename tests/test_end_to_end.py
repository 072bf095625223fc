"""A tiny MoCo v2 run built only from the public pieces lowers its loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from conftest import SmallCNN
from torch import nn

from momentum_contrast import KeyQueue, MomentumEncoder, info_nce, moco_v2_head


def two_views(images: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random 12x12 crops, horizontal flips and a little noise: two views per image."""

    def view() -> torch.Tensor:
        n = images.shape[0]
        top, left = torch.randint(0, 5, (2,), generator=g).tolist()
        out = images[:, :, top : top + 12, left : left + 12]
        flip = torch.rand(n, generator=g) < 0.5
        out = torch.where(flip[:, None, None, None], out.flip(-1), out)
        return out + 0.1 * torch.randn(out.shape, generator=g)

    return view(), view()


def test_moco_v2_steps_lower_the_loss() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    # fixed random images: smooth random colour fields (upsampled 4x4 noise)
    data = F.interpolate(torch.rand(64, 3, 4, 4, generator=g), size=16, mode="bilinear")
    query_encoder = nn.Sequential(SmallCNN(out_dim=32), moco_v2_head(32, hidden_dim=64, out_dim=16))
    key_encoder = MomentumEncoder(query_encoder, momentum=0.99)
    queue = KeyQueue(64, 16)  # two batches of keys
    optimizer = torch.optim.SGD(query_encoder.parameters(), lr=0.06, momentum=0.9)
    losses = []
    for step in range(50):
        idx = torch.randperm(64, generator=g)[:32]
        x_q, x_k = two_views(data[idx], g)
        q = query_encoder(x_q)  # (N, 16)
        k = key_encoder(x_k)  # (N, 16), no grad
        loss = info_nce(q, k, queue.negatives(), temperature=0.2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        key_encoder.update()
        queue.push(k)
        losses.append(loss.item())
        assert torch.isfinite(loss), step
    # From step 2 on the queue holds only the model's own keys (the random initial
    # keys are easy negatives, so the very first steps score low); from there the
    # loss must fall.
    first, last = sum(losses[5:15]) / 10, sum(losses[-10:]) / 10
    assert last < first - 0.3, (first, last)
