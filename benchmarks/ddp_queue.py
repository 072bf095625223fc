"""What DDP's per-forward buffer broadcast costs when the queue lives inside the module
it wraps (a LightningModule's layout, Accelerate's container, the authors' code), with
and without ``exclude_from_ddp``. Two gloo processes on the CPU (or NCCL on 2 GPUs).

    python benchmarks/ddp_queue.py                 # 65,536 x 128 queue, 2 CPU processes
    python benchmarks/ddp_queue.py --queue 16384   # a smaller queue

Each process runs the same MoCo v2 step (a small MLP encoder, batch 32, info_nce against
the queue, update, push); the median step time of rank 0 is reported for both layouts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save

from momentum_contrast import KeyQueue, MomentumEncoder, info_nce
from momentum_contrast.distributed import exclude_from_ddp


class MoCoV2(nn.Module):
    def __init__(self, queue: int, dim: int = 128) -> None:
        super().__init__()
        self.online = nn.Sequential(
            nn.Linear(256, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, dim)
        )
        self.key = MomentumEncoder(self.online, momentum=0.999)
        self.queue = KeyQueue(size=queue, dim=dim)

    def forward(self, x_q: torch.Tensor, x_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = F.normalize(self.online(x_q), dim=1)  # (N, C)
        with torch.no_grad():
            k = F.normalize(self.key(x_k), dim=1)  # (N, C)
        return info_nce(q, k, self.queue.negatives(), temperature=0.2), k


def _worker(r: int, world: int, init: str, queue: int, steps: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=r, world_size=world,
                            timeout=timedelta(seconds=120))  # fmt: skip
    results = {}
    for exclude in (False, True):
        torch.manual_seed(0)
        model = MoCoV2(queue)
        if exclude:
            exclude_from_ddp(model)
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(model.online.parameters(), lr=0.03, momentum=0.9)
        times = []
        for step in range(steps):
            x = torch.randn(32, 256)
            dist.barrier()
            t0 = time.perf_counter()
            loss, k = ddp(x, x + 0.1 * torch.randn_like(x))
            opt.zero_grad()
            loss.backward()
            opt.step()
            model.key.update()
            model.queue.push(k)
            if step >= 3:  # warm-up
                times.append((time.perf_counter() - t0) * 1e3)
        results["exclude_from_ddp" if exclude else "DDP default"] = statistics.median(times)
    if r == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queue", type=int, default=65536)
    parser.add_argument("--steps", type=int, default=23)
    args = parser.parse_args()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "out.pt")
        mp.spawn(_worker, args=(2, str(Path(tmp) / "init"), args.queue, args.steps, out), nprocs=2)
        results = torch.load(out, weights_only=True)
    rows = [{"layout": k, "queue": f"{args.queue} x 128", "step ms": v} for k, v in results.items()]
    save("ddp_queue", rows, {"processes": "2 (gloo, CPU)"})


if __name__ == "__main__":
    main()
