"""MoCo v2 in one screen: pre-train a small CNN on a built-in toy dataset, then kNN-evaluate.

Runs anywhere (CPU in about a minute, no download):

    python examples/quickstart.py                 # 300 steps on the CPU
    python examples/quickstart.py --device cuda   # same on a GPU
    python examples/quickstart.py --steps 50      # quicker

The toy dataset has four texture classes (horizontal stripes, vertical stripes,
checkerboards, diagonal stripes) with random colours, frequencies and phases. No
label is used in pre-training; a kNN classifier on the learned features reports
how well the classes separate, before and after.
"""

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from momentum_contrast import KeyQueue, MomentumEncoder, info_nce, moco_v2_head

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--steps", type=int, default=300)
parser.add_argument("--batch-size", type=int, default=64)
parser.add_argument("--queue-size", type=int, default=1024)
parser.add_argument("--device", default="cpu")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()
torch.manual_seed(args.seed)
device = torch.device(args.device)


def make_textures(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n images (n, 3, 40, 40) in [0, 1] and their labels (n,) in 0..3."""
    labels = torch.randint(0, 4, (n,), generator=g)
    yy, xx = torch.meshgrid(torch.arange(40.0), torch.arange(40.0), indexing="ij")
    freq = 0.3 + 0.5 * torch.rand(n, 1, 1, generator=g)
    phase = 2 * math.pi * torch.rand(n, 1, 1, generator=g)
    coords = torch.stack([yy, xx, yy * 0, xx + yy])  # (4, 40, 40): one per class
    wave = torch.sin(freq * coords[labels.clamp(max=1)] + phase)
    wave = torch.where((labels == 2)[:, None, None], wave * torch.sin(freq * xx + phase), wave)
    wave = torch.where((labels == 3)[:, None, None], torch.sin(freq * coords[3] + phase), wave)
    fg, bg = torch.rand(n, 3, 1, 1, generator=g), torch.rand(n, 3, 1, 1, generator=g)
    mix = (wave[:, None] > 0).float()
    return mix * fg + (1 - mix) * bg, labels


def augment(x: torch.Tensor) -> torch.Tensor:
    """A per-sample random 32x32 crop, flip and brightness/colour jitter (MoCo-style)."""
    n = x.shape[0]
    top, left = torch.randint(0, 9, (2, n), device=x.device)
    rows = top[:, None] + torch.arange(32, device=x.device)  # (n, 32)
    cols = left[:, None] + torch.arange(32, device=x.device)
    x = x[
        torch.arange(n, device=x.device)[:, None, None, None],
        torch.arange(3, device=x.device)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]
    x = torch.where(torch.rand(n, 1, 1, 1, device=x.device) < 0.5, x.flip(-1), x)
    x = x * (0.6 + 0.8 * torch.rand(n, 3, 1, 1, device=x.device))  # colour jitter
    return (x - 0.5) / 0.25


def backbone() -> nn.Module:
    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

    return nn.Sequential(
        *block(3, 32),
        nn.MaxPool2d(2),
        *block(32, 64),
        nn.MaxPool2d(2),
        *block(64, 128),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )  # (N, 128)


@torch.no_grad()
def knn_accuracy(
    net: nn.Module,
    train: torch.Tensor,
    y_train: torch.Tensor,
    test: torch.Tensor,
    y_test: torch.Tensor,
    k: int = 20,
) -> float:
    net.eval()
    bank = F.normalize(net((train[:, :, 4:36, 4:36] - 0.5) / 0.25), dim=1)
    feats = F.normalize(net((test[:, :, 4:36, 4:36] - 0.5) / 0.25), dim=1)
    sim, idx = (feats @ bank.T).topk(k, dim=1)
    votes = torch.zeros(len(test), 4, device=test.device)
    votes.scatter_add_(1, y_train[idx], (sim / 0.1).exp())
    net.train()
    return (votes.argmax(1) == y_test).float().mean().item()


g = torch.Generator().manual_seed(args.seed)
images, labels = (t.to(device) for t in make_textures(4096, g))
test_images, test_labels = (t.to(device) for t in make_textures(512, g))

feature_net = backbone()
query_encoder = nn.Sequential(feature_net, moco_v2_head(128, 128, 64)).to(device)
key_encoder = MomentumEncoder(query_encoder, momentum=0.99)  # the drop-in piece
queue = KeyQueue(args.queue_size, 64).to(device)
optimizer = torch.optim.SGD(query_encoder.parameters(), lr=0.06, momentum=0.9, weight_decay=5e-4)
schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.steps)

acc = knn_accuracy(feature_net, images, labels, test_images, test_labels)
print(f"kNN accuracy before pre-training: {acc:.3f}")
start = time.time()
for step in range(args.steps):
    batch = images[torch.randint(0, len(images), (args.batch_size,), device=device)]
    q = query_encoder(augment(batch))  # (N, 64)
    k = key_encoder(augment(batch))  # (N, 64), no grad
    loss = info_nce(q, k, queue.negatives(), temperature=0.2)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    schedule.step()
    key_encoder.update()
    queue.push(k)
    if step % 50 == 0 or step == args.steps - 1:
        print(f"step {step:4d}  loss {loss.item():.3f}  ({time.time() - start:.0f} s)")
acc = knn_accuracy(feature_net, images, labels, test_images, test_labels)
print(f"kNN accuracy after {args.steps} steps: {acc:.3f}")
