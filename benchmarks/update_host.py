"""Host time of ``MomentumEncoder.update()`` against the least an update can do: a plain walk
of both models (``named_parameters()``) plus one ``torch._foreach_lerp_``, as timm's and
``AveragedModel``'s updates are. Every parameter is shrunk to one element, so the device
work is nothing and the host work (walks, pairing checks, warnings) is all there is.

    python benchmarks/update_host.py              # ResNet-50 and ViT-B/16, float32 and ema_dtype
    python benchmarks/update_host.py --iters 20   # a quick run (the test's)
    python benchmarks/update_host.py --breakdown  # where the ResNet-50 ema_dtype update's time goes

Rows: the model, the precision (``float32``: float32 models; ``ema_dtype``: bfloat16 online
model, float32 key encoder, against a plain walk and lerp of two bfloat16 models), the
best-of-7 median microseconds of each, and their ratio (the target is <= 1.2).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save

from momentum_contrast import MomentumEncoder
from momentum_contrast._walk import layout, memo_of


def tiny(model: nn.Module) -> nn.Module:
    """``model``'s structure (names, modules) with one-element parameters."""
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[name] = nn.Parameter(torch.zeros(1))
    return model


def host_us(fn: Callable[[], object], iters: int = 2000, repeats: int = 7) -> float:
    """Best of ``repeats`` medians-of-batches: the least disturbed measure of a host loop."""
    for _ in range(min(iters, 100)):
        fn()
    batches = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        batches.append((time.perf_counter() - start) / iters * 1e6)
    return min(batches) if len(batches) < 3 else min(statistics.median(batches), min(batches))


def measure(arch: str, precision: str, iters: int) -> dict[str, object]:
    torch.manual_seed(0)
    online = tiny(getattr(torchvision.models, arch)())
    if precision == "ema_dtype":
        online.bfloat16()
    encoder = MomentumEncoder(online, ema_dtype=torch.float32 if precision == "ema_dtype" else None)
    plain_key = copy.deepcopy(online)  # the baseline's key: the online model's dtype

    @torch.no_grad()
    def plain() -> None:
        keys = [p for _, p in plain_key.named_parameters()]
        onlines = [p for _, p in online.named_parameters()]
        torch._foreach_lerp_(keys, onlines, 0.001)

    library = host_us(encoder.update, iters)
    baseline = host_us(plain, iters)
    return {
        "model": arch,
        "precision": precision,
        "update_us": round(library, 1),
        "plain_walk_lerp_us": round(baseline, 1),
        "ratio": round(library / baseline, 3),
    }


@torch.no_grad()
def breakdown(iters: int) -> list[dict[str, object]]:
    """The parts of the ResNet-50 ``ema_dtype`` update, each timed alone (private internals:
    the pairing's walks and comparison, the warning's version counters, the fused ops), and
    what one lerp over a flat buffer of the same elements would take instead of the lerp."""
    torch.manual_seed(0)
    online = tiny(torchvision.models.resnet50()).bfloat16()
    encoder = MomentumEncoder(online, ema_dtype=torch.float32)
    encoder.update()
    pairs = encoder._pairs["parameter"]
    ((keys, onlines, scratch),) = pairs.groups
    assert scratch is not None
    key = encoder.key_encoder
    flat_keys, flat_scratch = torch.zeros(len(keys)), torch.zeros(len(keys))
    parts: dict[str, Callable[[], object]] = {
        "update()": encoder.update,
        "both walks (names of children and tensors, no string built)": lambda: (
            layout(online, "parameter"),
            layout(key, "parameter"),
        ),
        "the baseline's two walks": lambda: (
            [p for _, p in online.named_parameters()],
            [p for _, p in key.named_parameters()],
        ),
        "both walks and the comparison with the previous one": lambda: (
            memo_of(online, key, "parameter", None, True, pairs.memo)[0] == pairs.memo
        ),
        "version counters (double-update warning)": lambda: encoder._warn_if_misused(pairs),
        "widening copy (_foreach_copy_)": lambda: torch._foreach_copy_(scratch, onlines),
        "lerp (_foreach_lerp_)": lambda: torch._foreach_lerp_(keys, scratch, 0.001),
        "one lerp_ over a flat buffer of as many elements": lambda: flat_keys.lerp_(
            flat_scratch, 0.001
        ),
    }
    return [{"part": name, "us": round(host_us(fn, iters), 1)} for name, fn in parts.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=2000, help="updates per timed batch")
    parser.add_argument("--breakdown", action="store_true", help="time the update's parts")
    args = parser.parse_args()
    iters = args.iters
    torch.set_num_threads(1)
    if args.breakdown:
        save("update_host_breakdown", breakdown(iters), {"model": "resnet50, ema_dtype"})
        return
    rows = [
        measure(arch, p, iters)
        for arch in ("resnet50", "vit_b_16")
        for p in ("float32", "ema_dtype")
    ]
    save("update_host", rows, {"target": "ratio <= 1.2"})


if __name__ == "__main__":
    main()
