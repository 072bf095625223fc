"""Timing helpers shared by the benchmarks: median of timed runs after warm-up.

On CUDA every run is timed with CUDA events around the call (GPU time, the
host's launch cost included only where it stalls the GPU); on the CPU with
``time.perf_counter``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch


def median_ms(
    fn: Callable[[], object], device: torch.device, warmup: int = 5, iters: int = 30
) -> float:
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        times = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth, bytes read + written per second (GB/s)."""
    n = nbytes // 4 if device.type == "cuda" else nbytes // 64
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, warmup=3, iters=10)
    return 2 * src.nbytes / (ms * 1e-3) / 1e9


def machine() -> dict[str, str]:
    info = {
        "date": date.today().isoformat(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": str(os.cpu_count()),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = str(torch.version.cuda)
    return info


def pick_device(argv: list[str] | None = None) -> torch.device:
    args = sys.argv[1:] if argv is None else argv
    if "--cpu" in args or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def save(name: str, rows: list[dict[str, object]], extra: dict[str, object]) -> None:
    """Print a markdown table and write ``$BENCH_OUT/<name>.json`` (default: ./runs)."""
    out = Path(os.environ.get("BENCH_OUT", "runs"))
    out.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine(), **extra, "rows": rows}
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2))
    keys = list(rows[0])
    print(f"\n## {name}  ({payload['machine']})")
    for k, v in extra.items():
        print(f"{k}: {v}")
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print(
            "| "
            + " | ".join(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys)
            + " |"
        )


def peak_extra_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak memory ``fn`` allocates above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    fn()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 1e6
