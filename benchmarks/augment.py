"""MoCo v2 two-view augmentation: reference CPU pipeline vs this library's batched GPU ops.

    python benchmarks/augment.py          # GPU if available (full sizes)
    python benchmarks/augment.py --cpu    # small sizes on the CPU

Measures, in one run on one machine:
  (a) the reference pipeline: PIL decode + torchvision transforms + PIL Gaussian blur,
      two views per image, DataLoader with one worker per CPU core;
  (b) kornia's equivalent pipeline on the GPU, if kornia is installed;
  (c) momentum_contrast.augment on decoded uint8 batches (equal and variable sizes),
      and JPEG -> two views with decoding on the GPU (nvjpeg) or in CPU workers;
  (d) a MoCo v2 ResNet-50 step fed by ready views vs by GPU augmentation each step.
Images are synthetic ImageNet-like JPEGs (500x375 and nearby sizes, quality 90).
"""

from __future__ import annotations

import io
import os
import random
import time
from typing import Any

import torch
from common import median_ms, pick_device, save
from PIL import Image, ImageDraw, ImageFilter
from torchvision import transforms as T

from momentum_contrast.augment import MoCoV1Augment, MoCoV2Augment, MoCoV3Augment

device = pick_device()
gpu = device.type == "cuda"
B = 256 if gpu else 16
N_JPEG = 1024 if gpu else 48  # 256 distinct images (128 on the CPU), each used 4 times
LOADER_BATCH = 32 if gpu else 8  # small loader batches keep every worker busy
WORKERS = os.cpu_count() or 1


def synthetic_jpeg(i: int) -> bytes:
    rnd = random.Random(i)
    w, h = rnd.choice([(500, 375), (500, 333), (375, 500), (500, 400), (480, 360)])
    img = Image.linear_gradient("L").resize((w, h)).convert("RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = rnd.randrange(w), rnd.randrange(h)
        box = (x0, y0, x0 + rnd.randrange(20, 200), y0 + rnd.randrange(20, 200))
        colour = tuple(rnd.randrange(256) for _ in range(3))
        (draw.ellipse if rnd.random() < 0.5 else draw.rectangle)(box, fill=colour)
    img = img.filter(ImageFilter.GaussianBlur(1)).effect_spread(2)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


class PILBlur:
    """The reference v2 blur: PIL GaussianBlur with radius ~ U(0.1, 2.0)."""

    def __call__(self, img: Image.Image) -> Image.Image:
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))


REFERENCE_V2 = T.Compose(
    [
        T.RandomResizedCrop(224, scale=(0.2, 1.0)),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([PILBlur()], p=0.5),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ]
)


class ReferenceDataset(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    def __init__(self, jpegs: list[bytes]) -> None:
        self.jpegs = jpegs

    def __len__(self) -> int:
        return len(self.jpegs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = Image.open(io.BytesIO(self.jpegs[i])).convert("RGB")
        return REFERENCE_V2(img), REFERENCE_V2(img)


class DecodeDataset(torch.utils.data.Dataset[torch.Tensor]):
    """CPU workers only decode (libjpeg via torchvision.io); augmentation runs on the GPU."""

    def __init__(self, jpegs: list[bytes]) -> None:
        self.data = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs]

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> torch.Tensor:
        from torchvision.io import decode_jpeg

        return decode_jpeg(self.data[i])


def loader_rate(dataset: Any, samples: int, collate: Any = None, consume: Any = None) -> float:
    """Two-view samples/s of a DataLoader once every worker has delivered its first batch."""
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=LOADER_BATCH,
        shuffle=True,
        num_workers=WORKERS,
        collate_fn=collate,
        pin_memory=gpu,
        drop_last=True,
        persistent_workers=True,
        prefetch_factor=2,
    )
    warm, timed = WORKERS, samples // LOADER_BATCH
    done, start = 0, 0.0
    while done < warm + timed:
        for batch in loader:
            if consume is not None:
                consume(batch)
            done += 1
            if done == warm:
                if gpu:
                    torch.cuda.synchronize()
                start = time.perf_counter()
            if done == warm + timed:
                break
    if gpu:
        torch.cuda.synchronize()
    return timed * LOADER_BATCH / (time.perf_counter() - start)


rows: list[dict[str, object]] = []


def record(label: str, ms: float | None = None, rate: float | None = None) -> None:
    rate = rate if rate is not None else B / (ms * 1e-3)  # type: ignore[operator]
    rows.append({"pipeline": label, "ms per batch": B / rate * 1e3, "two-view samples/s": rate})
    print(rows[-1], flush=True)


t0 = time.perf_counter()
distinct = [synthetic_jpeg(i) for i in range(N_JPEG // 4)]
jpegs = distinct * 4
kb = sum(map(len, jpegs)) / N_JPEG / 1e3
print(f"{N_JPEG} JPEGs in {time.perf_counter() - t0:.1f} s, {kb:.0f} kB each")

# (a) reference CPU pipeline
record(
    f"reference CPU pipeline (PIL + torchvision), {WORKERS} workers",
    rate=loader_rate(ReferenceDataset(jpegs), samples=2048 if gpu else 32),
)

# decoded batches for (b) and (c)
decoded = [DecodeDataset(jpegs)[i] for i in range(B)]
equal = torch.stack(
    [
        torch.nn.functional.interpolate(im[None].float(), size=(375, 500))[0].round().byte()
        for im in decoded
    ]
).to(device)
varied = [im.to(device) for im in decoded]

# (b) kornia, if installed
try:
    import kornia.augmentation as K

    kornia_v2 = torch.nn.Sequential(
        K.RandomResizedCrop((224, 224), scale=(0.2, 1.0)),
        K.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8),
        K.RandomGrayscale(p=0.2),
        K.RandomGaussianBlur((23, 23), (0.1, 2.0), p=0.5),
        K.RandomHorizontalFlip(),
        K.Normalize(
            mean=torch.tensor([0.485, 0.456, 0.406]), std=torch.tensor([0.229, 0.224, 0.225])
        ),
    ).to(device)
    as_float = equal.float() / 255
    record(
        "kornia v2, decoded 375x500 batch",
        median_ms(lambda: (kornia_v2(as_float), kornia_v2(as_float)), device, 2, 10),
    )
except ImportError:
    print("kornia not installed: skipped")

# (c) this library
variants = [  # the blur is two batched matrix products on every device
    ("v2 (defaults: float32 colour ops)", lambda: MoCoV2Augment()),
    ("v2, float16 colour ops", lambda: MoCoV2Augment(dtype=torch.float16)),
    ("v2, float16, compiled colour ops", lambda: MoCoV2Augment(dtype=torch.float16, compile=True)),
    ("v1", lambda: MoCoV1Augment()),
    ("v3", lambda: MoCoV3Augment()),
]
if os.environ.get("AUG_ALL"):
    variants += [
        ("v2, float32 resampling", lambda: MoCoV2Augment(resample_dtype=torch.float32)),
        ("v2, float32, compiled colour ops", lambda: MoCoV2Augment(compile=True)),
    ]
augs = {}
for label, make in variants:
    augs[label] = make().to(device)
    t0 = time.perf_counter()
    augs[label](equal)  # the first call compiles, where asked
    print(f"{label}: first call {time.perf_counter() - t0:.1f} s", flush=True)
    record(
        f"momentum_contrast {label}, decoded 375x500 uint8 batch",
        median_ms(lambda a=augs[label]: a(equal), device, 3, 20),
    )
fastest = augs["v2, float16, compiled colour ops"]
aug = MoCoV2Augment().to(device)
record(
    "momentum_contrast v2, list of variable-size uint8 images",
    median_ms(lambda: aug(varied), device, 3, 20),
)

if gpu:
    from torchvision.io import decode_jpeg

    raw = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs[:B]]
    record(
        "GPU decode (nvjpeg) only",
        median_ms(lambda: decode_jpeg(raw, device="cuda"), device, 3, 10),
    )
    record(
        "GPU decode + momentum_contrast v2",
        median_ms(lambda: aug(decode_jpeg(raw, device="cuda")), device, 3, 10),
    )
    record(
        "GPU decode + momentum_contrast v2 (float16, compiled)",
        median_ms(lambda: fastest(decode_jpeg(raw, device="cuda")), device, 3, 10),
    )
pending: list[torch.Tensor] = []


def augment_when_full(batch: list[torch.Tensor]) -> None:
    """Gather the workers' decoded images into batches of B and augment them."""
    pending.extend(im.to(device, non_blocking=True) for im in batch)
    if len(pending) >= B:
        aug(pending[:B])
        del pending[:B]


record(
    f"CPU decode in {WORKERS} workers + momentum_contrast v2 on {device.type}",
    rate=loader_rate(
        DecodeDataset(jpegs), samples=4096 if gpu else 32, collate=list, consume=augment_when_full
    ),
)

if gpu:  # where the GPU time of one v2 call goes
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fastest(equal)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))

# (d) the training step, fed by ready views vs by augmentation on the GPU each step
if gpu:
    import torchvision

    from momentum_contrast import (
        KeyQueue,
        MomentumEncoder,
        info_nce,
        moco_v2_head,
        strip_classifier,
    )

    backbone, dim = strip_classifier(torchvision.models.resnet50())
    model = torch.nn.Sequential(backbone, moco_v2_head(dim)).to(
        device, memory_format=torch.channels_last
    )
    key = MomentumEncoder(model)
    queue = KeyQueue(65536, 128).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)
    ready = [v.contiguous(memory_format=torch.channels_last) for v in aug(equal)]

    def step(x_q: torch.Tensor, x_k: torch.Tensor) -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            q = model(x_q.contiguous(memory_format=torch.channels_last))
            key.update()
            k = key(x_k.contiguous(memory_format=torch.channels_last))
            loss = info_nce(q, k, queue.negatives(), temperature=0.2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        queue.push(k)

    fed = median_ms(lambda: step(*ready), device, 3, 10)
    record("R50 MoCo v2 step, views ready on the GPU (tensor-fed)", fed)
    record(
        "R50 step + momentum_contrast v2 from a decoded uint8 batch",
        median_ms(lambda: step(*aug(equal)), device, 3, 10),
    )
    record(
        "R50 step + momentum_contrast v2 (float16, compiled) from a decoded batch",
        median_ms(lambda: step(*fastest(equal)), device, 3, 10),
    )
    record(
        "R50 step + GPU decode + momentum_contrast v2 (float16, compiled)",
        median_ms(lambda: step(*fastest(decode_jpeg(raw, device="cuda"))), device, 3, 10),
    )
    record(
        "R50 step + GPU decode + momentum_contrast v2",
        median_ms(lambda: step(*aug(decode_jpeg(raw, device="cuda"))), device, 3, 10),
    )

save("augment", rows, {"device": str(device), "batch": B, "cpu_workers": WORKERS})
