"""Momentum (EMA) update of the key encoder: reference-style loops vs MomentumEncoder.update.

    python benchmarks/ema_update.py          # GPU if available
    python benchmarks/ema_update.py --cpu

Floor = 3 x parameter bytes / measured copy bandwidth (read key, read online, write key).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torchvision
from common import copy_bandwidth_gbs, host_ms, median_ms, pick_device, save
from torch import nn

from momentum_contrast import MomentumEncoder

M = 0.999


def graphed(fn: Callable[[], None]) -> Callable[[], None]:
    """Capture ``fn`` once in a CUDA graph (valid because the update is in place)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def bench_model(
    name: str, online: nn.Module, device: torch.device, bandwidth: float
) -> list[dict[str, object]]:
    key = copy.deepcopy(online)
    pairs = list(zip(online.parameters(), key.parameters(), strict=True))
    ks, qs = [k for _, k in pairs], [q for q, _ in pairs]
    nbytes = sum(p.nbytes for p in online.parameters())
    floor_ms = 3 * nbytes / (bandwidth * 1e9) * 1e3

    def reference_data_loop() -> None:
        # the MoCo reference: param_k.data = param_k.data * m + param_q.data * (1 - m)
        for q, k in pairs:
            k.data = k.data * M + q.data * (1.0 - M)

    @torch.no_grad()
    def in_place_loop() -> None:
        for q, k in pairs:
            k.mul_(M).add_(q, alpha=1.0 - M)

    @torch.no_grad()
    def foreach_mul_add() -> None:
        torch._foreach_mul_(ks, M)
        torch._foreach_add_(ks, qs, alpha=1.0 - M)

    @torch.no_grad()
    def bare_foreach_lerp() -> None:
        torch._foreach_lerp_(ks, qs, 1.0 - M)

    encoder = MomentumEncoder(online, momentum=M)
    variants: dict[str, Callable[[], None]] = {
        "reference .data loop": reference_data_loop,
        "in-place loop": in_place_loop,
        "_foreach_mul_ + _foreach_add_": foreach_mul_add,
        "bare _foreach_lerp_ (no pairing checks)": bare_foreach_lerp,
        "MomentumEncoder.update()": encoder.update,
    }
    if device.type == "cuda":
        variants["MomentumEncoder.update() in a CUDA graph"] = graphed(encoder.update)
    rows: list[dict[str, object]] = []
    for label, fn in variants.items():
        ms = median_ms(fn, device)
        rows.append(
            {
                "model": name,
                "tensors": len(pairs),
                "MB": nbytes / 1e6,
                "variant": label,
                "ms": ms,
                "x floor": ms / floor_ms,
                "host ms": host_ms(fn, device),
            }
        )
    rows.append(
        {
            "model": name,
            "tensors": len(pairs),
            "MB": nbytes / 1e6,
            "variant": "floor",
            "ms": floor_ms,
            "x floor": 1.0,
            "host ms": 0.0,
        }
    )
    return rows


def main() -> None:
    device = pick_device()
    bandwidth = copy_bandwidth_gbs(device)
    rows: list[dict[str, object]] = []
    for name in ("resnet50", "vit_b_16"):
        rows += bench_model(name, getattr(torchvision.models, name)().to(device), device, bandwidth)
    save("ema_update", rows, {"device": str(device), "copy_GBps": bandwidth})


if __name__ == "__main__":
    main()
