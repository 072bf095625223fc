"""The benchmark sections of ``run.py``: each times a library piece and its reference-style
counterpart (``reference.py``) on the same inputs, in the same process.

Every function returns rows ``{"piece", "implementation", "ms", "vs reference", ...}``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import reference as ref
import torch
import torch.nn.functional as F
import torchvision
from common import median_ms, peak_extra_mb
from torch import nn

from momentum_contrast import (
    KeyQueue,
    MomentumEncoder,
    info_nce,
    moco_v2_head,
    strip_classifier,
    symmetric_contrastive_loss,
)

Row = dict[str, object]


def _pair(
    piece: str, device: torch.device, fns: dict[str, Callable[[], object]], **kw: int
) -> list[Row]:
    """Time each implementation; the first is the reference the others are compared with."""
    rows: list[Row] = []
    base = None
    for name, fn in fns.items():
        ms = median_ms(fn, device, **kw)
        base = base or ms
        rows.append({"piece": piece, "implementation": name, "ms": ms, "vs reference": base / ms})
    return rows


def graphed(fn: Callable[[], object]) -> Callable[[], object]:
    """Capture ``fn`` in a CUDA graph (after warm-up on a side stream); returns ``replay``."""
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


def ema(device: torch.device, bandwidth_gbs: float) -> list[Row]:
    rows: list[Row] = []
    for arch in ("resnet50", "vit_b_16"):
        online = getattr(torchvision.models, arch)().to(device)
        key = copy.deepcopy(online)
        encoder = MomentumEncoder(online, momentum=0.999)
        nbytes = sum(p.nbytes for p in online.parameters())
        floor = 3 * nbytes / (bandwidth_gbs * 1e9) * 1e3  # read key + read online + write key
        m = torch.tensor(0.999, device=device)  # the form CUDA graphs and compile take
        fns: dict[str, Callable[[], object]] = {
            "reference .data loop": lambda o=online, k=key: ref.ema_data_loop(o, k, 0.999),
            "MomentumEncoder.update()": encoder.update,
            "MomentumEncoder.update(0-d tensor m)": lambda e=encoder, m=m: e.update(m),
        }
        if device.type == "cuda":
            fns["MomentumEncoder.update() in a CUDA graph"] = graphed(encoder.update)
        for row in _pair(f"EMA update {arch} ({nbytes / 1e6:.0f} MB)", device, fns):
            rows.append({**row, "x floor": row["ms"] / floor})  # type: ignore[operator]
        rows.append({"piece": rows[-1]["piece"], "implementation": "bandwidth floor", "ms": floor})
        # The check of both models that precedes every update: host time only, no device work.
        check_ms = median_ms(lambda e=encoder: e._paired("parameter"), torch.device("cpu"))
        rows.append({"piece": rows[-1]["piece"], "implementation": "pairing check (host)",
                     "ms": check_ms})  # fmt: skip
    return rows


def queue_push(device: torch.device) -> list[Row]:
    keys = F.normalize(torch.randn(256, 128, device=device), dim=1)
    reference, ours = ref.HostPointerQueue(65536, 128, device), KeyQueue(65536, 128).to(device)
    return _pair(
        "KeyQueue.push, 256 keys into 65,536",
        device,
        {
            "reference (host pointer, slice)": lambda: reference.push(keys),
            "KeyQueue.push": lambda: ours.push(keys),
        },
    )


def contrastive_losses(device: torch.device) -> list[Row]:
    n, d, t = 256, 128, 0.2
    k_size = 65536 if device.type == "cuda" else 16384
    q = torch.randn(n, d, device=device, requires_grad=True)
    k = torch.randn(n, d, device=device)
    queue_dk = F.normalize(torch.randn(d, k_size, device=device), dim=0)  # reference layout
    queue = queue_dk.T.contiguous()  # (K, D), KeyQueue.negatives()'s layout

    def reference() -> None:
        ref.info_nce(q, k, queue_dk, t).backward()

    def ours() -> None:
        info_nce(q, k, queue, temperature=t).backward()

    rows = _pair(
        f"info_nce N {n}, D {d}, K {k_size} (fwd+bwd)",
        device,
        {"reference": reference, "info_nce": ours},
    )
    for row, fn in zip(rows, (reference, ours), strict=True):
        row["peak extra MB"] = peak_extra_mb(fn, device)

    n3, d3 = 1024, 256
    q1, q2 = (torch.randn(n3, d3, device=device, requires_grad=True) for _ in range(2))
    k1, k2 = (torch.randn(n3, d3, device=device) for _ in range(2))
    rows += _pair(
        f"symmetric_contrastive_loss N {n3}, D {d3} (fwd+bwd)",
        device,
        {
            "reference": lambda: ref.v3_loss(q1, q2, k1, k2, t).backward(),
            "symmetric_contrastive_loss": lambda: symmetric_contrastive_loss(
                q1, q2, k1, k2, temperature=t
            ).backward(),
        },
    )
    return rows


def v2_step(device: torch.device) -> list[Row]:
    """A full MoCo v2 step; on the GPU ResNet-50, batch 256, 224 px, bf16, channels-last."""
    gpu = device.type == "cuda"
    arch, b, s = ("resnet50", 256, 224) if gpu else ("resnet50", 8, 96)
    fmt = torch.channels_last if gpu else torch.contiguous_format
    x_q, x_k = (torch.randn(b, 3, s, s, device=device).to(memory_format=fmt) for _ in range(2))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu)

    def build() -> tuple[nn.Module, nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        features, dim = strip_classifier(getattr(torchvision.models, arch)())
        model = nn.Sequential(features, moco_v2_head(dim)).to(device, memory_format=fmt)
        key = copy.deepcopy(model).requires_grad_(False)
        return (
            model,
            key,
            torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4),
        )

    model_b, key_b, opt_b = build()

    def backbone_only() -> None:  # the encoders' forward/backward/step, no MoCo machinery
        with autocast:
            q = model_b(x_q)
            with torch.no_grad():
                k = key_b(x_k)
            loss = (q.float() * k.float()).sum()
        opt_b.zero_grad(set_to_none=True)
        loss.backward()
        opt_b.step()

    model_r, key_r, opt_r = build()
    queue_r = ref.HostPointerQueue(65536, 128, device)

    def reference_step() -> None:
        with autocast:
            q = model_r(x_q)
            with torch.no_grad():
                ref.ema_data_loop(model_r, key_r, 0.999)
                k = F.normalize(key_r(x_k), dim=1)
            loss = ref.info_nce(q.float(), k.float(), queue_r.negatives(), 0.2)
        opt_r.zero_grad()
        loss.backward()
        opt_r.step()
        queue_r.push(k.float())

    model, _, opt = build()
    key_encoder = MomentumEncoder(model)
    queue = KeyQueue(65536, 128).to(device)

    def library_step() -> None:
        with autocast:
            q = model(x_q)
            key_encoder.update()
            k = key_encoder(x_k)
            loss = info_nce(q, k, queue.negatives(), temperature=0.2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        queue.push(k)

    iters = {"warmup": 3, "iters": 10 if gpu else 5}
    piece = f"MoCo v2 step {arch}, batch {b}, {s} px"
    rows = _pair(
        piece,
        device,
        {"reference-style step": reference_step, "library step": library_step},
        **iters,
    )
    base = median_ms(backbone_only, device, **iters)
    rows.append({"piece": piece, "implementation": "backbone only (no MoCo machinery)", "ms": base})
    for row in rows[:2]:
        row["machinery % of backbone"] = 100 * (row["ms"] - base) / base  # type: ignore[operator]
    return rows
