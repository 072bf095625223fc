"""Scenarios of the scaling-out tests (host collectives, gradient accumulation), run on
spawned gloo ranks by ``_dist_workers.launch`` or directly in one process (no group)."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from _dist_workers import global_tensor
from torch import nn

import momentum_contrast._collectives as collectives
import momentum_contrast.distributed as mcd
from momentum_contrast import KeyQueue, MomentumEncoder, info_nce, symmetric_contrastive_loss

BATCH, MICRO, DIM, QUEUE = 8, 4, 8, 40  # per rank: 4 micro-batches of 2
T_V2, T_V3 = 0.2, 0.5


def ln_model() -> nn.Module:
    """LayerNorm, no BatchNorm: a sample's output does not depend on the batch."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, DIM)).double()


def initial_queue() -> torch.Tensor:
    return F.normalize(global_tensor(30, QUEUE, DIM), dim=1)


def rank_batch(seed: int, r: int) -> torch.Tensor:
    """Rank ``r``'s (BATCH, 6) inputs: rows ``r * BATCH ...`` of one global tensor."""
    return global_tensor(seed, 4 * BATCH, 6)[r * BATCH : (r + 1) * BATCH]


def scenario_accumulate_v2() -> dict[str, Any]:
    """MoCo v2, 4 micro-batches: one queue snapshot, one key update, one push after."""
    r = mcd.rank()
    model = ln_model()
    key_encoder = MomentumEncoder(model, momentum=0.9)
    queue = KeyQueue(QUEUE, DIM, dtype=torch.float64)
    queue.keys.copy_(initial_queue())
    x_q, x_k = rank_batch(20, r), rank_batch(21, r)
    negatives = queue.negatives()  # one snapshot for the whole window
    total, window = torch.zeros((), dtype=torch.float64), []
    for chunk in range(MICRO):
        rows = slice(chunk * BATCH // MICRO, (chunk + 1) * BATCH // MICRO)
        k = key_encoder(x_k[rows])
        loss = info_nce(model(x_q[rows]), k, negatives, temperature=T_V2) / MICRO
        loss.backward()  # gradients accumulate
        total += loss.detach()
        window.append(k)
    queue.push(torch.cat(window))  # once, in the full batch's order
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}  # type: ignore[union-attr]
    return {"loss": total, "grads": grads, "queue": queue.keys.clone(), "ptr": queue.ptr.clone()}


def scenario_accumulate_v3() -> dict[str, Any]:
    """MoCo v3, 4 micro-batches scored against the keys of the whole batch of all ranks."""
    r = mcd.rank()
    model = ln_model()
    key_encoder = MomentumEncoder(model, momentum=0.99)
    x1, x2 = rank_batch(22, r), rank_batch(23, r)
    k1, k2 = key_encoder(x1), key_encoder(x2)  # the whole local batch, first
    total = torch.zeros((), dtype=torch.float64)
    size = BATCH // MICRO
    for chunk in range(MICRO):
        rows = slice(chunk * size, (chunk + 1) * size)
        loss = symmetric_contrastive_loss(
            model(x1[rows]), model(x2[rows]), k1, k2, temperature=T_V3, positive_offset=rows.start
        )
        (loss / MICRO).backward()
        total += loss.detach() / MICRO
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}  # type: ignore[union-attr]
    return {"loss": total, "grads": grads}


def _counted(counts: dict[str, int], label: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call ``fn``, adding the host all-gathers it made to ``counts[label]``."""
    calls = []
    real = collectives.all_gather_host

    def counting(values: list[int], group: Any = None) -> list[list[int]]:
        calls.append(values)
        return real(values, group)

    collectives.all_gather_host = counting  # type: ignore[assignment]
    try:
        return fn(*args, **kwargs)
    finally:
        collectives.all_gather_host = real  # type: ignore[assignment]
        counts[label] = counts.get(label, 0) + len(calls)


def scenario_host_collectives() -> dict[str, Any]:
    """Host all-gathers per MoCo v2 piece and v3 loss; results with and without the
    equal-batch promise; and that a broken promise raises on every rank."""
    r = mcd.rank()
    out: dict[str, Any] = {}
    torch.manual_seed(0)
    key_encoder = nn.Linear(3, DIM).double()
    for mode in ("default", "assume", "unequal"):
        queue = KeyQueue(QUEUE, DIM, dtype=torch.float64)
        queue.keys.copy_(initial_queue())
        counts: dict[str, int] = {}
        losses = []
        context = mcd.assume_equal_batches() if mode == "assume" else contextlib.nullcontext()
        with context:
            for step in range(3):
                n = 5 + (r if mode == "unequal" else 0)
                x = global_tensor(40 + step, 4 * 8, 3)[r * 8 : r * 8 + n]
                keys = global_tensor(50 + step, 4, 4 * 8, DIM)[:, r * 8 : r * 8 + n]
                g = torch.Generator().manual_seed(step)
                shuffled, idx = _counted(counts, "batch_shuffle", mcd.batch_shuffle, x, g)
                k = _counted(
                    counts, "batch_unshuffle", mcd.batch_unshuffle, key_encoder(shuffled), idx
                )
                _counted(counts, "push", queue.push, k)
                loss = _counted(
                    counts, "v3_loss", symmetric_contrastive_loss, *keys.unbind(0), temperature=T_V3
                )
                losses.append(loss)
                out[f"{mode}_k{step}"] = k
                out[f"{mode}_expected{step}"] = key_encoder(x).detach()  # no shuffle at all
        out[f"{mode}_counts"] = counts
        out[f"{mode}_queue"] = queue.keys.clone()
        out[f"{mode}_losses"] = torch.stack(losses)
    for label, x in (
        ("shape", torch.zeros(4, 6) if r == 0 else torch.zeros(3, 8)),  # same element count
        ("dtype", torch.zeros(3, 4) if r == 0 else torch.zeros(3, 4, dtype=torch.int32)),
    ):
        try:
            with mcd.assume_equal_batches():
                mcd.concat_all_gather(x)
            out[f"broken_{label}"] = "no error"
        except ValueError as e:
            out[f"broken_{label}"] = str(e)
    _, idx = mcd.batch_shuffle(torch.zeros(4, 3))
    try:  # key encoder outputs of another layout on rank 1, the same byte count
        mcd.batch_unshuffle(torch.zeros(4, 4) if r == 0 else torch.zeros(4, 2, 2), idx)
        out["broken_unshuffle"] = "no error"
    except ValueError as e:
        out["broken_unshuffle"] = str(e)
    _, idx = mcd.batch_shuffle(torch.zeros(4, 3))
    # rank 1's key encoder gives a row fewer than it shuffled: every rank hears of it (it
    # raised on rank 1 alone, and rank 0 waited in the gather: a hang)
    try:
        mcd.batch_unshuffle(torch.zeros(4 if r != 1 else 3, 3), idx)
        out["broken_rows"] = "no error"
    except ValueError as e:
        out["broken_rows"] = str(e)
    out["after"] = mcd.concat_all_gather(torch.full((1, 2), float(r)))  # the group still works
    return out
