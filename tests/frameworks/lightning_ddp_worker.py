"""One rank of tests/frameworks/test_lightning.py's 2-process run (started by
its test, as Lightning's launcher would: one process per ``LOCAL_RANK``): the guide's modules under
Lightning's ``strategy="ddp"`` and ``ModelParallelStrategy`` (FSDP2), on gloo.

Usage: ``lightning_ddp_worker.py OUT_DIR``; each rank writes ``OUT_DIR/rank<r>.pt``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any


def _full(t: Any) -> Any:
    """A DTensor's whole value (every rank takes part), a plain tensor as it is."""
    full = getattr(t, "full_tensor", None)
    return (full() if full is not None else t).detach().clone()


def main(out_dir: Path) -> None:
    began = time.perf_counter()

    def phase(name: str) -> None:  # in the rank's log, which the test shows on failure
        print(f"[{time.perf_counter() - began:6.1f} s] {name}", flush=True)

    import torch

    torch.set_num_threads(1)
    import lightning as L
    import torch.distributed as dist
    import torch.nn as nn
    from lightning.pytorch.strategies import ModelParallelStrategy
    from test_lightning import (
        DIM,
        QUEUE,
        QUIET,
        loader,
        module_state,
        tiny,
        tiny_vit,
        v2,
        v3,
        views,
    )

    from momentum_contrast import MomentumEncoder

    broadcast: list[int] = []  # data pointers of every tensor DDP broadcasts
    original = dist._broadcast_coalesced

    def recording(
        process_group: dist.ProcessGroup, tensors: list[torch.Tensor], buffer_size: int, src: int
    ) -> Any:
        broadcast.extend(t.data_ptr() for t in tensors)
        return original(process_group, tensors, buffer_size, src)

    dist._broadcast_coalesced = recording

    class Watch(L.Callback):  # type: ignore[misc]
        """What DDP was told to skip, seen from inside the run."""

        def on_train_batch_start(self, trainer: Any, module: Any, *args: Any) -> None:
            ddp = trainer.strategy.model
            self.wrapped = isinstance(ddp, nn.parallel.DistributedDataParallel)
            self.ignored = sorted(ddp.parameters_to_ignore) if self.wrapped else []

    def trainer(**kwargs: Any) -> Any:
        return L.Trainer(accelerator="cpu", devices=2, **QUIET, **kwargs)

    phase("imported")
    out: dict[str, Any] = {}
    data = views(32)

    # MoCo v2 under DDP, 4 steps of 2 x 4 rows, float64
    module, watch = v2(), Watch()
    t = trainer(strategy="ddp", max_epochs=1, precision="64-true", callbacks=[watch])
    t.fit(module, loader(data, 4))
    out["v2"] = module_state(module)
    out["v2_steps"] = t.global_step
    out["v2_ddp"] = {"wrapped": watch.wrapped, "ignored": watch.ignored}
    out["v2_queue_broadcast"] = module.queue.keys.data_ptr() in broadcast
    out["v2_broadcasts"] = len(broadcast)

    phase("v2 under DDP")

    # the same without exclude_from_ddp: the recording sees the queue go out
    class Unexcluded(type(module)):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.__dict__.pop("_ddp_params_and_buffers_to_ignore", None)

    broadcast.clear()
    control = Unexcluded(tiny(0), DIM, queue_size=QUEUE)
    trainer(strategy="ddp", max_steps=2).fit(control, loader(data, 4))
    out["control_queue_broadcast"] = control.queue.keys.data_ptr() in broadcast

    phase("v2 without exclude_from_ddp")
    # MoCo v3 under DDP, 2 steps of 2 x 8 rows, each as 2 micro-batches, float64
    module = v3(accumulate=2)
    t = trainer(strategy="ddp", max_epochs=1, precision="64-true")
    t.fit(module, loader(data, 8))
    out["v3"] = module_state(module)
    out["v3_steps"] = t.global_step

    phase("v3 under DDP")
    # MoCo v3 with FSDP2: the guide's ShardedMoCoV3 on a small ViT, float32
    from _lightning_guide import load

    sharded_cls = load("MoCoV3", "ShardedMoCoV3")["ShardedMoCoV3"]
    encoder, predictor = tiny_vit()
    module = sharded_cls(encoder, predictor, momentum=0.9, lr=0.01, accumulate=2)
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    images = torch.Generator().manual_seed(3)
    x1, x2 = torch.randn(2, 32, 3, 16, 16, generator=images)
    t = trainer(strategy=strategy, max_epochs=1)
    t.fit(module, loader((x1, x2), 8))
    out["fsdp_steps"] = t.global_step
    out["fsdp_sharded"] = type(module.key_encoder.key_encoder[1].weight).__name__
    out["fsdp"] = {
        "online": {n: _full(p) for n, p in module.online.named_parameters()},
        "key": {n: _full(p) for n, p in module.key_encoder.key_encoder.named_parameters()},
        "predictor": {n: _full(p) for n, p in module.predictor.named_parameters()},
    }
    phase("v3 under FSDP2")
    assert isinstance(module.key_encoder, MomentumEncoder)
    torch.save(out, out_dir / f"rank{dist.get_rank()}.pt")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main(Path(sys.argv[1]))
    from _leave import leave_process_group

    leave_process_group()
