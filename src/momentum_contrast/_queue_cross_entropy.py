"""InfoNCE against a queue with fewer passes over the ``(N, M)`` logits than ``cat`` +
cross-entropy: the logits are written once, by the matrix product, straight into a buffer
that also holds the positive column; the backward pass is one ``exp`` and one product.

Columns ``[0, M)`` hold ``q·n_j``, column ``M`` holds ``q·k``, and the row is padded with
``-inf`` to a multiple of four elements (aligned rows for the matrix products). The loss
of query ``i`` is ``-log_softmax(row_i)[M]``; its gradient with respect to ``q_i`` is
``sum_j p_ij n_j + (p_iM - 1) k_i`` with ``p = softmax(row)``. Neither ``k`` nor the
negatives get a gradient (MoCo detaches them). Under ``create_graph=True`` the backward
recomputes the softmax from ``q`` with differentiable ops, so second derivatives are exact.
"""

from __future__ import annotations

from typing import Any

import torch


class QueueCrossEntropy(torch.autograd.Function):
    """Per-query loss ``(N,)`` from ``q`` (already divided by T), ``k`` and negatives."""

    @staticmethod
    def forward(
        ctx: Any, q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor
    ) -> torch.Tensor:
        n, m = q.shape[0], negatives.shape[0]
        width = m + 4 - m % 4  # room for the positive column and padding to 16 bytes
        logits = torch.empty(n, width, dtype=q.dtype, device=q.device)  # (N, W)
        torch.mm(q, negatives.T, out=logits[:, :m])  # (N, M): one write
        logits[:, m] = (q * k).sum(dim=1)  # (N,) positives
        logits[:, m + 1 :] = float("-inf")
        log_p = torch.log_softmax(logits, dim=1)  # (N, W)
        ctx.save_for_backward(log_p, q, k, negatives)
        return -log_p[:, m]  # (N,)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        log_p, q, k, negatives = ctx.saved_tensors
        m = negatives.shape[0]
        if torch.is_grad_enabled():  # create_graph=True: a differentiable recomputation
            logits = torch.cat([q @ negatives.T, (q * k).sum(dim=1, keepdim=True)], dim=1)
            p = torch.softmax(logits, dim=1)  # (N, M + 1)
        else:
            p = log_p.exp()  # (N, W) softmax; the -inf padding gives 0
        grad_q = torch.mm(p[:, :m], negatives)  # (N, D)
        grad_q = grad_q + (p[:, m] - 1).unsqueeze(1) * k
        return grad_q * grad.unsqueeze(1), None, None
