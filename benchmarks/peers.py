"""The same MoCo pieces in the reference code's style, in lightly and in this library.

    pip install lightly==1.6.0     # only for this comparison; not a dependency
    python benchmarks/peers.py     # CPU here; GPU if available (or --cpu)

Measures, in one process: the momentum update of a ResNet-50 parameter set, one queue
push of 256 keys into a 65,536 x 128 queue (plus reading the negatives), how many
device-to-host reads each push makes, and how many of the newest keys a queue holds
after pushes whose size does not divide the queue. solo-learn 1.0.2 is not imported:
its momentum update and queue are the reference's code style (per-parameter ``.data``
loop, ``int(queue_ptr)``, ``assert queue_size % batch_size == 0``), timed here as
"reference".
"""

from __future__ import annotations

import copy

import torch
import torchvision
from common import median_ms, pick_device, save
from torch.utils._python_dispatch import TorchDispatchMode

from momentum_contrast import KeyQueue, MomentumEncoder

try:
    from lightly.models.modules.memory_bank import MemoryBankModule
    from lightly.models.utils import update_momentum
except ImportError:  # pragma: no cover - optional
    MemoryBankModule = update_momentum = None

M, SIZE, DIM, BATCH = 0.999, 65536, 128, 256
NA: dict[str, object] = {"ms": "", "host reads": "", "held": ""}


class HostReads(TorchDispatchMode):
    """Counts device-to-host scalar reads (``int(t)``, ``t.item()``)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


class ReferenceQueue:
    """The reference ``_dequeue_and_enqueue``: host-read pointer, slice assignment."""

    def __init__(self, device: torch.device) -> None:
        self.queue = torch.nn.functional.normalize(torch.randn(SIZE, DIM, device=device), dim=1)
        self.ptr = torch.zeros(1, dtype=torch.long, device=device)

    def push(self, keys: torch.Tensor) -> torch.Tensor:
        n = keys.shape[0]
        ptr = int(self.ptr)
        assert SIZE % n == 0
        self.queue[ptr : ptr + n] = keys
        self.ptr[0] = (ptr + n) % SIZE
        return self.queue.clone().detach()  # the reference passes queue.clone().detach()


def newest_kept(push, negatives, batch: int, pushes: int) -> int:  # type: ignore[no-untyped-def]
    """Push ``pushes`` batches of distinct keys; count the newest ``SIZE`` keys still held."""
    keys = torch.nn.functional.normalize(torch.randn(pushes * batch, DIM), dim=1)
    for i in range(pushes):
        push(keys[i * batch : (i + 1) * batch])
    held = negatives()
    newest = keys[-SIZE:]
    return int((newest @ held.T).max(dim=1).values.gt(1 - 1e-5).sum())


def main() -> None:
    device = pick_device()
    rows: list[dict[str, object]] = []
    online = torchvision.models.resnet50().to(device)
    key = copy.deepcopy(online)
    pairs = list(zip(online.parameters(), key.parameters(), strict=True))

    def reference_loop() -> None:
        for q, k in pairs:
            k.data = k.data * M + q.data * (1.0 - M)

    encoder = MomentumEncoder(online, momentum=M).to(device)
    ema = {"reference .data loop (solo-learn alike)": reference_loop}
    if update_momentum is not None:
        ema["lightly update_momentum"] = lambda: update_momentum(online, key, M)
    ema["MomentumEncoder.update"] = encoder.update
    for name, fn in ema.items():
        ms = median_ms(fn, device)
        rows.append({"piece": "EMA ResNet-50", "implementation": name, **NA, "ms": ms})

    keys = torch.nn.functional.normalize(torch.randn(BATCH, DIM, device=device), dim=1)
    ref = ReferenceQueue(device)
    ours = KeyQueue(SIZE, DIM).to(device)
    pushes = {"reference (solo-learn alike)": lambda: ref.push(keys)}
    if MemoryBankModule is not None:
        bank = MemoryBankModule(size=(SIZE, DIM)).to(device)
        pushes["lightly MemoryBankModule"] = lambda: bank(keys, update=True)
    pushes["KeyQueue.push + negatives"] = lambda: (ours.push(keys), ours.negatives())
    for name, fn in pushes.items():
        ms = median_ms(fn, device)
        with HostReads() as reads:
            fn()
        rows.append(
            {
                "piece": "queue push 256",
                "implementation": name,
                **NA,
                "ms": ms,
                "host reads": reads.count,
            }
        )

    # batches of 100 into a 65,536 queue: 656 pushes; the newest 65,536 keys should be held
    pushes_needed = SIZE // 100 + 1
    q = KeyQueue(SIZE, DIM)
    kept = {}
    kept["KeyQueue"] = newest_kept(q.push, q.negatives, 100, pushes_needed)
    if MemoryBankModule is not None:
        b = MemoryBankModule(size=(SIZE, DIM))
        kept["lightly MemoryBankModule"] = newest_kept(
            lambda k: b(k, update=True), lambda: b.bank, 100, pushes_needed
        )
    for name, n in kept.items():
        rows.append(
            {"piece": "newest 65,536 keys held, batch 100", "implementation": name, **NA, "held": n}
        )
    save("peers", rows, {"lightly": "1.6.0" if update_momentum is not None else "not installed"})


if __name__ == "__main__":
    main()
