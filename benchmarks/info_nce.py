"""InfoNCE with a 65,536-key queue (N 256, D 128, T 0.2), forward + backward, and enqueue.

python benchmarks/info_nce.py          # GPU if available
python benchmarks/info_nce.py --cpu    # smaller queue on the CPU
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from common import median_ms, pick_device, save

from momentum_contrast import KeyQueue, info_nce

device = pick_device()
N, D, T = 256, 128, 0.2
K = 65536 if device.type == "cuda" else 8192
torch.manual_seed(0)
q = torch.randn(N, D, device=device, requires_grad=True)
k = torch.randn(N, D, device=device)
queue = KeyQueue(K, D).to(device)
queue_bf16 = KeyQueue(K, D, dtype=torch.bfloat16).to(device)
ref_queue = F.normalize(torch.randn(D, K, device=device), dim=0)  # the reference's (D, K) layout
ref_ptr = [0]


def reference() -> None:
    # MoCo reference: einsum l_pos / l_neg against a cloned queue, cat, /T, cross-entropy
    qn, kn = F.normalize(q, dim=1), F.normalize(k, dim=1)
    l_pos = torch.einsum("nc,nc->n", qn, kn).unsqueeze(-1)
    l_neg = torch.einsum("nc,ck->nk", qn, ref_queue.clone().detach())
    logits = torch.cat([l_pos, l_neg], dim=1) / T
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=device)
    F.cross_entropy(logits, labels).backward()


def ours() -> None:
    info_nce(q, k, queue.negatives(), temperature=T).backward()


def ours_bf16_queue() -> None:
    info_nce(q, k, queue_bf16.negatives(), temperature=T).backward()


def ours_autocast() -> None:
    with torch.autocast(device.type, dtype=torch.bfloat16):
        info_nce(q, k, queue.negatives(), temperature=T).backward()


def reference_enqueue() -> None:
    # reference _dequeue_and_enqueue: slice assignment at a host-side pointer
    ptr = ref_ptr[0]
    ref_queue[:, ptr : ptr + N] = F.normalize(k, dim=1).T
    ref_ptr[0] = (ptr + N) % K


def ours_enqueue() -> None:
    queue.push(k)


rows: list[dict[str, object]] = []
for label, fn in {
    "reference: einsum, cloned queue, cat, CE (fwd+bwd)": reference,
    "info_nce(q, k, queue.negatives()) (fwd+bwd)": ours,
    "same, bf16 queue storage": ours_bf16_queue,
    "same, under bf16 autocast": ours_autocast,
    "reference enqueue (slice assignment, host pointer)": reference_enqueue,
    "KeyQueue.push (index_copy_, device pointer)": ours_enqueue,
}.items():
    rows.append({"variant": label, "ms": median_ms(fn, device)})
save("info_nce", rows, {"device": str(device), "N": N, "D": D, "K": K, "T": T})
