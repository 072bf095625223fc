"""A full MoCo v2 ResNet-50 training step: reference-style pieces vs this library's.

Batch 256 at 224 px, bf16 autocast, channels-last, inputs already on the GPU (as the
anchor figures). On the CPU (``--cpu``) a ResNet-18 at batch 16, 96 px stands in.

    python benchmarks/moco_v2_step.py
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
import torchvision
from common import median_ms, pick_device, save
from torch import nn

from momentum_contrast import KeyQueue, MomentumEncoder, info_nce, moco_v2_head, strip_classifier

device = pick_device()
gpu = device.type == "cuda"
arch, B, S = ("resnet50", 256, 224) if gpu else ("resnet18", 16, 96)
K, T, m = 65536, 0.2, 0.999
fmt = torch.channels_last if gpu else torch.contiguous_format
torch.manual_seed(0)
x_q = torch.randn(B, 3, S, S, device=device).to(memory_format=fmt)
x_k = torch.randn(B, 3, S, S, device=device).to(memory_format=fmt)


def build() -> nn.Module:
    backbone, dim = strip_classifier(getattr(torchvision.models, arch)())
    return nn.Sequential(backbone, moco_v2_head(dim)).to(device, memory_format=fmt)


# reference style: two encoders, .data EMA loop, (D, K) queue with slice enqueue
ref_q = build()
ref_k = copy.deepcopy(ref_q)
for p in ref_k.parameters():
    p.requires_grad = False
ref_queue = F.normalize(torch.randn(128, K, device=device), dim=0)
ref_ptr = [0]
ref_opt = torch.optim.SGD(ref_q.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)


def reference_step() -> None:
    with torch.autocast(device.type, dtype=torch.bfloat16):
        q = F.normalize(ref_q(x_q), dim=1)
        with torch.no_grad():
            for pq, pk in zip(ref_q.parameters(), ref_k.parameters(), strict=True):
                pk.data = pk.data * m + pq.data * (1.0 - m)
            k = F.normalize(ref_k(x_k), dim=1)
        l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
        l_neg = torch.einsum("nc,ck->nk", q, ref_queue.clone().detach())
        logits = torch.cat([l_pos, l_neg], dim=1) / T
        loss = F.cross_entropy(logits, torch.zeros(B, dtype=torch.long, device=device))
    ref_opt.zero_grad()
    loss.backward()
    ref_opt.step()
    ptr = ref_ptr[0]
    ref_queue[:, ptr : ptr + B] = k.float().T
    ref_ptr[0] = (ptr + B) % K


# this library
model = build()
key_encoder = MomentumEncoder(model, momentum=m)
queue = KeyQueue(K, 128).to(device)
opt = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)


def our_step() -> None:
    with torch.autocast(device.type, dtype=torch.bfloat16):
        q = model(x_q)
        key_encoder.update()
        k = key_encoder(x_k)
        loss = info_nce(q, k, queue.negatives(), temperature=T)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    queue.push(k)


rows: list[dict[str, object]] = []
iters = 10 if gpu else 3
for label, fn in {
    "reference-style step": reference_step,
    "momentum_contrast step": our_step,
}.items():
    ms = median_ms(fn, device, warmup=3, iters=iters)
    rows.append({"variant": label, "ms": ms, "images/s": B / (ms * 1e-3)})
save("moco_v2_step", rows, {"device": str(device), "arch": arch, "batch": B, "size": S})
