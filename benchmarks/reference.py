"""Reference-style implementations, written here in the MoCo papers' code style, so that
every benchmark compares the library with what people run today, in the same process.

- EMA: ``param_k.data = param_k.data * m + param_q.data * (1 - m)`` per parameter.
- Queue: a ``(D, K)`` buffer, the pointer read back to the host (``int(queue_ptr)``),
  slice assignment, and ``queue.clone().detach()`` as the negatives.
- InfoNCE: two ``einsum``s, ``cat``, divide by ``T``, cross-entropy against class 0.
- MoCo v3 loss: ``q @ k.T / T``, cross-entropy against ``arange(N)``, times ``2T``, twice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def ema_data_loop(online: nn.Module, key: nn.Module, m: float) -> None:
    for q, k in zip(online.parameters(), key.parameters(), strict=True):
        k.data = k.data * m + q.data * (1.0 - m)


class HostPointerQueue:
    """The reference ``_dequeue_and_enqueue``: (D, K) storage, host-read pointer."""

    def __init__(self, size: int, dim: int, device: torch.device) -> None:
        self.queue = F.normalize(torch.randn(dim, size, device=device), dim=0)  # (D, K)
        self.ptr = torch.zeros(1, dtype=torch.long, device=device)
        self.size = size

    def push(self, keys: torch.Tensor) -> None:
        n = keys.shape[0]
        ptr = int(self.ptr)  # a device-to-host read: waits for the GPU
        assert self.size % n == 0
        self.queue[:, ptr : ptr + n] = keys.T
        self.ptr[0] = (ptr + n) % self.size

    def negatives(self) -> torch.Tensor:
        return self.queue.clone().detach()  # (D, K)


def info_nce(q: torch.Tensor, k: torch.Tensor, queue_dk: torch.Tensor, t: float) -> torch.Tensor:
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)  # (N, 1)
    l_neg = torch.einsum("nc,ck->nk", q, queue_dk)  # (N, K)
    logits = torch.cat([l_pos, l_neg], dim=1) / t  # (N, 1 + K)
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, labels)


def v3_loss(
    q1: torch.Tensor, q2: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, t: float
) -> torch.Tensor:
    def ctr(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
        logits = torch.einsum("nc,mc->nm", q, k) / t
        labels = torch.arange(logits.shape[0], dtype=torch.long, device=q.device)
        return F.cross_entropy(logits, labels) * (2 * t)

    return ctr(q1, k2) + ctr(q2, k1)
