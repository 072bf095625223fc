"""2 gloo processes (``torch.distributed.run``): docs/guides/accelerate.md's code under DDP.

Writes ``rank<r>.json`` into the directory given as the first argument; the assertions
are in ``test_accelerate.py::test_two_processes``.
"""

from __future__ import annotations

import copy
import faulthandler
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
from _leave import leave_process_group
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from torch import nn
from torch.utils.data import DataLoader

from momentum_contrast import KeyQueue, MomentumEncoder, cosine_momentum
from momentum_contrast.distributed import exclude_from_ddp

_spec = importlib.util.spec_from_file_location(
    "_accelerate_guide", Path(__file__).resolve().parent / "_accelerate_guide.py"
)
assert _spec is not None and _spec.loader is not None
g = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(g)
guide = g.guide()
T = 0.2
N = 4  # rows per process; the global batch is 8


def mine(data: list) -> list:
    """This process's rows of each global batch."""
    r = dist.get_rank()
    return [tuple(x[r * N : (r + 1) * N] for x in views) for views in data]


def same_on_every_rank(t: torch.Tensor) -> bool:
    everyone = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, t.contiguous())
    return all(torch.equal(everyone[0], x) for x in everyone)


def from_rank0(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    dist.broadcast(t, src=0)
    return t


def v2_matches_one_process(res: dict) -> None:
    accelerator = Accelerator(cpu=True)  # CPU processes under torchrun: see the guide
    online = g.ln_model().double()
    moco = guide["MoCoV2"](copy.deepcopy(online), dim=16, queue_size=24, momentum=0.9).double()
    queue_state = copy.deepcopy(moco.queue.state_dict())
    exclude_from_ddp(moco)
    model, optimizer = accelerator.prepare(moco, g.sgd(moco.online.parameters()))
    res["ddp_wrapped"] = isinstance(model, nn.parallel.DistributedDataParallel)
    res["ddp_ignores_queue"] = {"queue.keys", "queue.ptr", "queue.length"} <= set(
        model.parameters_to_ignore
    )
    data = g.batches(3, 2 * N, dtype=torch.float64)
    window: list[torch.Tensor] = []
    for x_q, x_k in mine(data):
        guide["train_step"](accelerator, model, optimizer, x_q, x_k, window)
    plain = g.plain_v2(online, queue_state, data, 0.9, T)
    res["v2_max_diff"] = max(
        g.max_diff(moco.online, plain[0]),
        g.max_diff(moco.key_encoder, plain[1]),
        g.max_diff(moco.queue, plain[2]),
    )
    res["v2_trained"] = g.max_diff(moco.online, g.ln_model().double())
    same = [same_on_every_rank(t) for t in (moco.queue.keys, moco.queue.ptr)]  # both, always
    res["queues_equal_across_ranks"] = all(same)


def v3_matches_one_process(res: dict) -> None:
    accelerator = Accelerator(cpu=True)  # CPU processes under torchrun: see the guide
    base = g.ln_model().double()
    torch.manual_seed(1)
    predictor = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 16))
    predictor = predictor.double()
    moco = guide["MoCoV3"](copy.deepcopy(base), copy.deepcopy(predictor), temperature=T)
    exclude_from_ddp(moco)
    optimizer = g.sgd([*moco.base.parameters(), *moco.predictor.parameters()])
    model, optimizer = accelerator.prepare(moco, optimizer)
    data = g.batches(3, 2 * N, dtype=torch.float64)
    for step, (x1, x2) in enumerate(mine(data)):
        m = cosine_momentum(step, len(data))
        guide["train_step_v3"](accelerator, model, optimizer, x1, x2, m, micro_batches=2)
    plain = g.plain_v3(base, predictor, data, T)
    res["v3_max_diff"] = max(
        g.max_diff(moco.base, plain[0]),
        g.max_diff(moco.predictor, plain[1]),
        g.max_diff(moco.key_encoder, plain[2]),
    )
    res["v3_trained"] = g.max_diff(moco.base, g.ln_model().double())


def ddp_leaves_the_queue_alone(res: dict) -> None:
    """Rank 1 writes a sentinel into its queue; one DDP forward follows."""
    accelerator = Accelerator(cpu=True)  # CPU processes under torchrun: see the guide
    x_q, x_k = mine(g.batches(1, 2 * N))[0]
    for exclude in (True, False):
        moco = guide["MoCoV2"](g.ln_model(), dim=16, queue_size=24)
        if exclude:
            exclude_from_ddp(moco)
        model, _ = accelerator.prepare(moco, g.sgd(moco.online.parameters()))
        if dist.get_rank() == 1:
            moco.queue.keys.fill_(7.0)
        loss, _ = model(x_q, x_k)
        loss.backward()
        sentinel = bool((moco.queue.keys == 7.0).all())
        if dist.get_rank() == 0:  # no sentinel here: the queue must not hold one
            ok = not bool((moco.queue.keys == 7.0).any())
        else:
            ok = sentinel if exclude else not sentinel
        key = "sentinel_kept_with_exclude" if exclude else "sentinel_overwritten_without_exclude"
        res[key] = ok


def resume_is_exact(res: dict, directory: str) -> None:
    """The guide's checkpoint functions with a BatchNorm model, Shuffle-BN and a shuffled,
    seedable loader (as the guide builds it): 2 epochs straight, against 1 epoch, a new
    build with other weights and other random state that loads the checkpoint, epoch 2."""
    views = torch.utils.data.TensorDataset(*g.batches(1, 8 * N)[0])  # 4 steps per epoch

    def build(seed: int) -> tuple[Accelerator, nn.Module, nn.Module, Any, Any]:
        loaders = DataLoaderConfiguration(use_seedable_sampler=True, data_seed=0)  # the guide's
        accelerator = Accelerator(cpu=True, dataloader_config=loaders)
        moco = guide["MoCoV2"](g.bn_model(seed=seed), dim=16, queue_size=24, momentum=0.9)
        exclude_from_ddp(moco)
        loader = DataLoader(views, batch_size=N, shuffle=True, drop_last=True)
        model, optimizer, loader = accelerator.prepare(
            moco, g.sgd(moco.online.parameters()), loader
        )
        return accelerator, moco, model, optimizer, loader

    def key_encoder(moco: nn.Module) -> nn.Module:
        """The page's ``moco.key_encoder.key_encoder`` (the container is built by the page)."""
        return cast(MomentumEncoder, moco.key_encoder).key_encoder

    def key_buffers(moco: nn.Module) -> dict[str, torch.Tensor]:
        return {n: b.clone() for n, b in key_encoder(moco).named_buffers()}

    accelerator, moco, model, optimizer, loader = build(0)
    guide["train_epochs"](accelerator, model, optimizer, loader, 0, 2, directory + "_straight")
    final = copy.deepcopy(moco.state_dict())
    mean = key_encoder(moco).get_buffer("1.running_mean")  # the BatchNorm's
    res["key_bn_differs_from_rank0"] = not torch.equal(mean, from_rank0(mean))

    accelerator, moco, model, optimizer, loader = build(0)
    guide["train_epochs"](accelerator, model, optimizer, loader, 0, 1, directory)  # stopped
    at_save = key_buffers(moco)
    torch.manual_seed(1000 + dist.get_rank())  # a new process: other random state
    accelerator, moco, model, optimizer, loader = build(5)  # other weights: loaded below
    accelerator.load_state(directory)  # Accelerate alone: process 0's state dict everywhere
    res["key_buffers_restored_by_load_state_alone"] = g.equal(key_buffers(moco), at_save)
    first_epoch = guide["load_checkpoint"](accelerator, model, directory)
    res["resume_key_buffers_equal"] = g.equal(key_buffers(moco), at_save)
    res["resume_first_epoch"] = first_epoch
    guide["train_epochs"](accelerator, model, optimizer, loader, first_epoch, 2, directory)
    # a collective: every rank calls it
    same_queue = same_on_every_rank(cast(KeyQueue, moco.queue).keys)
    res["resume_equal"] = g.equal(moco.state_dict(), final) and same_queue


def main() -> None:
    out = Path(sys.argv[1])
    (out / f"pid{os.environ['RANK']}").write_text(str(os.getpid()))  # for the test to end
    res: dict = {}
    v2_matches_one_process(res)
    res["world_size"] = dist.get_world_size()
    v3_matches_one_process(res)
    ddp_leaves_the_queue_alone(res)
    resume_is_exact(res, str(out / "checkpoint"))
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(res))


if __name__ == "__main__":  # never at import (pytest's doctest collection imports it)
    torch.set_num_threads(1)
    faulthandler.dump_traceback_later(150, exit=True)  # a hang ends with every thread's stack
    main()
    leave_process_group()
