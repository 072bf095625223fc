"""Helpers for the distributed tests: spawn real gloo process groups on the CPU.

Each scenario runs on every rank and returns a dict of tensors, saved to disk and
compared by the parent test against single-process references.
"""

from __future__ import annotations

import faulthandler
import gc
import multiprocessing as mp
import os
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from _torch_version import torch_at_least
from torch import nn

from momentum_contrast import KeyQueue, MomentumEncoder, info_nce, symmetric_contrastive_loss
from momentum_contrast.distributed import (
    batch_shuffle,
    batch_unshuffle,
    concat_all_gather,
    gather_sizes,
    rank,
    world_size,
)

TIMEOUT_S = 120
# Before torch 2.8 (pytorch PR 154976) the gloo process group's destructor held the GIL
# while it waited for its worker threads, and a worker freeing the tensors of a finished
# collective waits for the GIL: destroy_process_group hung at times (torch 2.5.1: 3 runs
# in 8 of the 2-process accumulation tests). The ranks then leave without it.
GIL_RELEASED_IN_DESTROY = torch_at_least("2.8")


def destroy_in_process() -> None:
    """``destroy_process_group`` in the test process itself (which cannot leave instead):
    before torch 2.8 after a barrier and a 0.2 s pause, which let the worker threads finish
    with the last collective's tensors first (none in 60 hung so, against 2 in 10 without:
    torch 2.5.1, 2-core CPU, 2026-12-06; the examples do the same)."""
    if not GIL_RELEASED_IN_DESTROY:
        dist.barrier()
        time.sleep(0.2)
    dist.destroy_process_group()


# Batch sizes per push, per rank, for the queue scenario (unequal on purpose).
QUEUE_PUSHES = [[4, 4, 4], [3, 5, 1], [1, 7, 2], [6, 2, 6], [0, 3, 1]]
VARIABLE_SIZES = [3, 5, 2]


def fully_shard(module: nn.Module, **kwargs: Any) -> Any:
    """FSDP2's ``fully_shard``, public in ``torch.distributed.fsdp`` from torch 2.6 (before:
    ``torch.distributed._composable.fsdp``)."""
    try:
        from torch.distributed.fsdp import fully_shard as shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard as shard
    return shard(module, **kwargs)


def global_tensor(seed: int, *shape: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The same tensor on every rank (and in the parent)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def local_rows(x: torch.Tensor, sizes: list[int], r: int) -> torch.Tensor:
    start = sum(sizes[:r])
    return x[start : start + sizes[r]]


def _entry(fn: Callable[[], dict[str, Any]], r: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    # a rank still running near the parent's deadline writes where each thread is
    stacks = open(Path(out) / f"rank{r}.stacks", "w")  # noqa: SIM115 (open until exit)
    faulthandler.dump_traceback_later(TIMEOUT_S - 10, file=stacks)
    os.environ["GLOO_SOCKET_IFNAME"] = os.environ.get("GLOO_SOCKET_IFNAME", "lo")
    timeout = timedelta(seconds=TIMEOUT_S // 2)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=r, world_size=world, timeout=timeout)
    try:
        torch.save(fn(), Path(out) / f"rank{r}.pt")
    except BaseException:
        (Path(out) / f"rank{r}.err").write_text(traceback.format_exc())
        if not GIL_RELEASED_IN_DESTROY:
            os._exit(1)
        raise
    # free what the scenario left in reference cycles (a DistributedDataParallel, its
    # reducer's threads) while the group lives: freed at exit, after the group was
    # destroyed, it aborted the process at times ("terminate called without an active
    # exception", torch 2.14)
    gc.collect()
    if not GIL_RELEASED_IN_DESTROY:
        dist.barrier()  # no rank leaves while another still talks to it
        os._exit(0)
    dist.destroy_process_group()


def launch(fn: Callable[[], dict[str, Any]], world: int, tmp: Path) -> list[dict[str, Any]]:
    """Run ``fn`` on ``world`` spawned gloo ranks; return each rank's result."""
    ctx = mp.get_context("spawn")
    # the ranks meet in a store this process serves until they are gone (a file:// store
    # hung torch 2.5's destroy_process_group at times: the first rank out removed the file)
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    procs = [
        ctx.Process(target=_entry, args=(fn, r, world, store.port, str(tmp))) for r in range(world)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(TIMEOUT_S)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    errors = [f.read_text() for f in sorted(tmp.glob("rank*.err"))]
    stacks = [(tmp / f"rank{r}.stacks").read_text() for r in hung]
    assert not hung, f"ranks {hung} hung for {TIMEOUT_S} s; errors: {errors}; stacks: {stacks}"
    assert all(p.exitcode == 0 for p in procs), "\n".join(errors)
    # the ranks' own results (any picklable value): torch older than 2.6 warns without the flag
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]


def scenario_core() -> dict[str, Any]:
    """Symmetric loss, queue pushes, gathers and Shuffle-BN on every rank."""
    r, w = rank(), world_size()
    out: dict[str, Any] = {"rank": r, "world": w}

    # MoCo v3 loss, equal batch sizes, through a shared linear layer
    n, d = 4, 6
    x1, x2 = global_tensor(1, w * n, d), global_tensor(2, w * n, d)
    k1, k2 = global_tensor(3, w * n, d), global_tensor(4, w * n, d)
    weight = global_tensor(5, d, d).requires_grad_()
    sl = slice(r * n, (r + 1) * n)
    q1, q2 = x1[sl] @ weight, x2[sl] @ weight
    loss = symmetric_contrastive_loss(q1, q2, k1[sl], k2[sl], temperature=0.2)
    loss.backward()
    out["v3_loss"], out["v3_grad"] = loss.detach(), weight.grad

    # MoCo v3 loss, unequal batch sizes
    sizes = VARIABLE_SIZES[:w]
    total = sum(sizes)
    q1, q2 = global_tensor(6, total, d), global_tensor(7, total, d)
    k1, k2 = global_tensor(8, total, d), global_tensor(9, total, d)
    out["v3_var_loss"] = symmetric_contrastive_loss(
        local_rows(q1, sizes, r),
        local_rows(q2, sizes, r),
        local_rows(k1, sizes, r),
        local_rows(k2, sizes, r),
        temperature=0.5,
    )

    # queue: pushes of unequal sizes on each rank
    queue = KeyQueue(13, 4, dtype=torch.float64)
    queue.keys.copy_(global_tensor(10, 13, 4))  # same start everywhere
    for step, per_rank in enumerate(QUEUE_PUSHES):
        sizes = per_rank[:w]
        keys = global_tensor(100 + step, sum(sizes), 4)
        queue.push(local_rows(keys, sizes, r))
    out["queue"] = {k: v.clone() for k, v in queue.state_dict().items()}
    out["queue_len"] = len(queue)

    # gathers and Shuffle-BN, equal and unequal sizes
    out["sizes"] = gather_sizes(10 + r)
    for label, sizes in (("equal", [8] * w), ("unequal", VARIABLE_SIZES[:w])):
        x = torch.arange(float(sum(sizes)))[:, None].repeat(1, 2)  # row i holds i
        mine = local_rows(x, sizes, r)
        out[f"gather_{label}"] = concat_all_gather(mine)
        shuffled, idx = batch_shuffle(mine)
        out[f"shuffled_{label}"], out[f"idx_{label}"] = shuffled, idx
        out[f"restored_{label}"] = batch_unshuffle(shuffled * 3 + 1, idx)
        out[f"expected_{label}"] = mine * 3 + 1
    return out


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


def scenario_ddp_moco_v2() -> dict[str, Any]:
    """Three MoCo v2 steps under DistributedDataParallel with Shuffle-BN and a queue."""
    r = rank()
    torch.manual_seed(0)  # same initial weights on every rank
    model = TinyNet()
    online = nn.parallel.DistributedDataParallel(model)
    key_encoder = MomentumEncoder(online, momentum=0.9)
    queue = KeyQueue(40, 16)
    optimizer = torch.optim.SGD(online.parameters(), lr=0.1, momentum=0.9)
    torch.manual_seed(100 + r)  # different data on each rank
    losses = []
    for _ in range(3):
        x_q, x_k = torch.randn(6, 3, 8, 8), torch.randn(6, 3, 8, 8)
        q = online(x_q)
        shuffled, idx = batch_shuffle(x_k)
        k = batch_unshuffle(key_encoder(shuffled), idx)
        loss = info_nce(q, k, queue.negatives(), temperature=0.2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        key_encoder.update()
        queue.push(k)
        losses.append(loss.detach())
    return {
        "key_params": {n: p.clone() for n, p in key_encoder.key_encoder.named_parameters()},
        "online_params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "queue": {k: v.clone() for k, v in queue.state_dict().items()},
        "losses": torch.stack(losses),
    }


def scenario_encoder_after_ddp() -> dict[str, Any]:
    """Ranks seeded differently (no common seed): the multi-GPU guide's order, the
    MomentumEncoder built from the DDP model, gives every rank rank 0's key encoder; one
    built before DDP made the weights rank 0's keeps each rank's own (why the guides say
    after)."""
    torch.manual_seed(10 + rank())
    model = TinyNet()
    before = MomentumEncoder(model)
    online = nn.parallel.DistributedDataParallel(model)
    after = MomentumEncoder(online)
    optimizer = torch.optim.SGD(online.parameters(), lr=0.1)
    online(torch.randn(4, 3, 8, 8)).pow(2).mean().backward()
    optimizer.step()
    after.update()
    before.update()
    return {
        name: {n: p.clone() for n, p in encoder.key_encoder.named_parameters()}
        for name, encoder in (("before", before), ("after", after))
    } | {"online": {n: p.detach().clone() for n, p in model.named_parameters()}}


def scenario_queue_random_init() -> dict[str, Any]:
    """Every rank seeded differently: the random initial keys are still the same on every
    rank, with no collective (a rank that reads its negatives alone, before any push, does
    not wait for the others), and the global random stream is not drawn from."""
    torch.manual_seed(1000 + rank())  # the ranks' generators differ, as with seed + rank
    state = torch.get_rng_state()
    queue = KeyQueue(32, 8)
    out: dict[str, Any] = {"global_untouched": torch.equal(torch.get_rng_state(), state)}
    if rank() == 1:
        out["alone"] = queue.negatives()  # rank 0 is not calling anything meanwhile
    torch.distributed.barrier()
    out["negatives"] = queue.negatives()
    queue.push(torch.randn(2, 8, generator=torch.Generator().manual_seed(rank())))
    out["after_push"] = queue.keys.clone()
    return out


def scenario_gather_mismatch() -> dict[str, Any]:
    """Ranks pass different trailing shapes or dtypes: every rank must raise."""
    r = rank()
    out: dict[str, Any] = {}
    for label, x in (
        ("shape", torch.zeros(3, 4 + r)),
        ("dtype", torch.zeros(3, 4, dtype=torch.float32 if r == 0 else torch.float64)),
        ("ndim", torch.zeros(3, 4) if r == 0 else torch.zeros(3, 2, 2)),
    ):
        try:
            concat_all_gather(x)
            out[label] = "no error"
        except ValueError as e:
            out[label] = str(e)
    out["after"] = concat_all_gather(torch.full((2, 3), float(r)))  # the group still works
    return out
