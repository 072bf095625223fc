"""Every bad input gets a ValueError/TypeError naming the argument, expected and actual."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import momentum_contrast as mc
from momentum_contrast.augment import MoCoV2Augment, ViewRecipe
from momentum_contrast.augment import functional as AF
from momentum_contrast.convert import backbone_state_dict
from momentum_contrast.distributed import batch_unshuffle
from momentum_contrast.knn import knn_predict
from momentum_contrast.norm import SplitBatchNorm
from momentum_contrast.optim import LARS
from momentum_contrast.vit import freeze_patch_embedding, sincos_position_embedding

q8, k8 = torch.randn(4, 8), torch.randn(4, 8)
neg8 = torch.randn(16, 8)


def lars(**settings: float) -> None:
    LARS([torch.zeros(2, requires_grad=True)], **settings)


def queue_push(keys: torch.Tensor, dim: int = 8) -> None:
    mc.KeyQueue(32, dim).push(keys)


CASES: list[tuple[str, Callable[[], object], type[Exception], list[str]]] = [
    # losses
    (
        "query/key shape mismatch",
        lambda: mc.info_nce(q8, torch.randn(5, 8)),
        ValueError,
        ["positive_key", "(4, 8)", "(5, 8)"],
    ),
    (
        "key dim mismatch",
        lambda: mc.info_nce(q8, torch.randn(4, 7)),
        ValueError,
        ["positive_key", "(4, 8)", "(4, 7)"],
    ),
    (
        "queue of another dim",
        lambda: mc.info_nce(q8, k8, torch.randn(16, 6)),
        ValueError,
        [
            "negative_keys",
            "8 columns",
            "(16, 6)",
            "KeyQueue's dim must equal the head's output width",
        ],
    ),
    (
        "1-D query",
        lambda: mc.info_nce(torch.randn(8), torch.randn(8)),
        ValueError,
        ["query", "2-D", "(8,)"],
    ),
    (
        "3-D negatives",
        lambda: mc.info_nce(q8, k8, torch.randn(2, 16, 8)),
        ValueError,
        ["negative_keys", "2-D", "(2, 16, 8)"],
    ),
    (
        "integer query",
        lambda: mc.info_nce(torch.ones(4, 8, dtype=torch.long), k8),
        TypeError,
        ["query", "floating-point", "torch.int64"],
    ),
    (
        "integer negatives",
        lambda: mc.info_nce(q8, k8, torch.ones(3, 8, dtype=torch.int32)),
        TypeError,
        ["negative_keys", "floating-point", "torch.int32"],
    ),
    (
        "non-tensor query",
        lambda: mc.info_nce([[1.0]], k8),  # type: ignore[arg-type]
        TypeError,
        ["query", "torch.Tensor", "list"],
    ),
    (
        "zero temperature",
        lambda: mc.info_nce(q8, k8, temperature=0.0),
        ValueError,
        ["temperature", "> 0", "0.0"],
    ),
    (
        "negative temperature",
        lambda: mc.info_nce(q8, k8, temperature=-1),
        ValueError,
        ["temperature", "> 0", "-1"],
    ),
    (
        "tensor temperature",
        lambda: mc.info_nce(q8, k8, temperature=torch.tensor(0.1)),  # type: ignore[arg-type]
        TypeError,
        ["temperature", "real number", "Tensor"],
    ),
    (
        "unknown reduction",
        lambda: mc.info_nce(q8, k8, reduction="avg"),  # type: ignore[arg-type]
        ValueError,
        ["reduction", "'mean'", "'avg'"],
    ),
    (
        "negatives on another device",
        lambda: mc.info_nce(q8, k8, torch.empty(3, 8, device="meta")),
        ValueError,
        ["negative_keys", "cpu", "meta"],
    ),
    (
        "symmetric shape mismatch",
        lambda: mc.symmetric_contrastive_loss(q8, q8, k8, torch.randn(3, 8)),
        ValueError,
        ["k2", "(4, 8)", "(3, 8)"],
    ),
    (
        "symmetric bad temperature",
        lambda: mc.symmetric_contrastive_loss(q8, q8, k8, k8, temperature=0),
        ValueError,
        ["temperature", "> 0"],
    ),
    (
        "InfoNCE bad reduction",
        lambda: mc.InfoNCE(reduction="max"),  # type: ignore[arg-type]
        ValueError,
        ["reduction", "'max'"],
    ),
    (
        "SymmetricContrastiveLoss bad temperature",
        lambda: mc.SymmetricContrastiveLoss(temperature=-0.5),
        ValueError,
        ["temperature", "-0.5"],
    ),
    # momentum encoder
    (
        "momentum above 1",
        lambda: mc.MomentumEncoder(nn.Linear(2, 2), momentum=1.5),
        ValueError,
        ["momentum", "[0, 1]", "1.5"],
    ),
    (
        "momentum below 0 in update",
        lambda: mc.MomentumEncoder(nn.Linear(2, 2)).update(-0.1),
        ValueError,
        ["momentum", "[0, 1]", "-0.1"],
    ),
    (
        "momentum as string",
        lambda: mc.MomentumEncoder(nn.Linear(2, 2), momentum="0.9"),  # type: ignore[arg-type]
        TypeError,
        ["momentum", "real number", "str"],
    ),
    (
        "unknown buffers",
        lambda: mc.MomentumEncoder(nn.Linear(2, 2), buffers="average"),  # type: ignore[arg-type]
        ValueError,
        ["buffers", "'own'", "'average'"],
    ),
    (
        "online not a module",
        lambda: mc.MomentumEncoder(torch.randn(2)),  # type: ignore[arg-type]
        TypeError,
        ["online", "nn.Module", "Tensor"],
    ),
    (
        "cosine step past the end",
        lambda: mc.cosine_momentum(11, 10),
        ValueError,
        ["step", "[0, total_steps=10]", "11"],
    ),
    ("cosine zero total", lambda: mc.cosine_momentum(0, 0), ValueError, ["total_steps", "> 0"]),
    (
        "cosine base above 1",
        lambda: mc.cosine_momentum(0, 10, base=1.2),
        ValueError,
        ["base", "[0, 1]", "1.2"],
    ),
    # queue
    ("queue size 0", lambda: mc.KeyQueue(0, 8), ValueError, ["size", ">= 1", "0"]),
    ("queue negative dim", lambda: mc.KeyQueue(8, -3), ValueError, ["dim", ">= 1", "-3"]),
    ("queue float size", lambda: mc.KeyQueue(8.0, 3), TypeError, ["size", "int", "float"]),  # type: ignore[arg-type]
    (
        "queue integer dtype",
        lambda: mc.KeyQueue(8, 3, dtype=torch.int64),
        TypeError,
        ["dtype", "floating-point", "torch.int64"],
    ),
    (
        "queue float8 dtype (no index_copy_, no arithmetic)",
        lambda: mc.KeyQueue(8, 3, dtype=torch.float8_e4m3fn),
        TypeError,
        ["dtype", "float16, bfloat16, float32 or float64", "torch.float8_e4m3fn"],
    ),
    (
        "augment float8 dtype",
        lambda: MoCoV2Augment(size=8, dtype=torch.float8_e5m2),
        TypeError,
        ["dtype", "float16, bfloat16, float32 or float64", "torch.float8_e5m2"],
    ),
    (
        "queue unknown init",
        lambda: mc.KeyQueue(8, 3, init="zeros"),  # type: ignore[arg-type]
        ValueError,
        ["init", "'random'", "'zeros'"],
    ),
    (
        "push of another dim",
        lambda: queue_push(torch.randn(4, 6)),
        ValueError,
        ["keys", "8 columns", "(4, 6)"],
    ),
    ("push 1-D", lambda: queue_push(torch.randn(8)), ValueError, ["keys", "2-D", "(8,)"]),
    (
        "push integers",
        lambda: queue_push(torch.ones(2, 8, dtype=torch.long)),
        TypeError,
        ["keys", "floating-point", "torch.int64"],
    ),
    (
        "push on another device",
        lambda: queue_push(torch.empty(2, 8, device="meta")),
        ValueError,
        ["keys", "cpu", "meta"],
    ),
    # heads
    (
        "mlp zero layers",
        lambda: mc.build_mlp(4, hidden_dim=4, out_dim=4, num_layers=0),
        ValueError,
        ["num_layers", ">= 1", "0"],
    ),
    ("head zero dim", lambda: mc.moco_v2_head(0), ValueError, ["in_dim", ">= 1", "0"]),
    (
        "projector bad hidden",
        lambda: mc.moco_v3_projector(8, hidden_dim=-1),
        ValueError,
        ["hidden_dim", "-1"],
    ),
    (
        "strip a tensor",
        lambda: mc.strip_classifier(torch.randn(3)),  # type: ignore[arg-type]
        TypeError,
        ["model", "nn.Module", "Tensor"],
    ),
    # knn
    (
        "knn features without a column (every score 0)",
        lambda: knn_predict(
            torch.randn(3, 0), torch.randn(4, 0), torch.zeros(4, dtype=torch.long), 2
        ),
        ValueError,
        ["features at least one column", "(4, 0)", "(3, 0)"],
    ),
    (
        "knn float labels",
        lambda: knn_predict(q8, neg8, torch.zeros(16), 3),
        TypeError,
        ["bank_labels", "integer dtype", "torch.float32"],
    ),
    (
        "knn labels of another length",
        lambda: knn_predict(q8, neg8, torch.zeros(15, dtype=torch.long), 3),
        ValueError,
        ["bank_labels", "(16,)", "(15,)"],
    ),
    (
        "knn label out of range",
        lambda: knn_predict(q8, neg8, torch.arange(16), 10),
        ValueError,
        ["bank_labels", "[0, num_classes=10)", "[0, 15]"],
    ),
    (
        "knn bank on another device",
        lambda: knn_predict(q8, torch.empty(16, 8, device="meta"), torch.zeros(16), 3),
        ValueError,
        ["bank", "cpu", "meta"],
    ),
    # optim
    ("LARS NaN lr", lambda: lars(lr=float("nan")), ValueError, ["lr", "finite", "nan"]),
    (
        "LARS infinite momentum",
        lambda: lars(momentum=float("inf")),
        ValueError,
        ["momentum", ">= 0", "inf"],
    ),
    (
        "LARS negative trust",
        lambda: lars(trust_coefficient=-1e-3),
        ValueError,
        ["trust_coefficient", ">= 0", "-0.001"],
    ),
    # vit, norm
    (
        "sincos temperature 0",
        lambda: sincos_position_embedding(2, 2, 8, temperature=0.0),
        ValueError,
        ["temperature", "> 0", "0.0"],
    ),
    (
        "split BN rows",
        lambda: SplitBatchNorm(4, 3)(torch.randn(10, 4)),
        ValueError,
        ["num_splits=3", "10 rows"],
    ),
    # augment
    (
        "augment int16 images",
        lambda: MoCoV2Augment(size=8)(torch.zeros(2, 3, 16, 16, dtype=torch.int16)),
        TypeError,
        ["images", "uint8", "torch.int16"],
    ),
    (
        "augment 0-255 floats",
        lambda: MoCoV2Augment(size=8)(torch.full((2, 3, 16, 16), 200.0)),
        ValueError,
        ["images", "[0, 1]", "200.0"],
    ),
    (
        "brightness of a complex image",
        lambda: AF.adjust_brightness(torch.zeros(2, 3, 4, 4, dtype=torch.complex64), q8[:2, 0]),
        TypeError,
        ["x", "floating-point", "torch.complex64"],
    ),
    (
        "crop box past the bottom",
        lambda: AF.resized_crop(torch.zeros(1, 3, 8, 8), torch.tensor([[4, 0, 5, 8]]), 4),
        ValueError,
        ["boxes[0]", "top 4", "height 5", "top + height <= 8"],
    ),
    (
        "positional ViewRecipe",
        lambda: ViewRecipe((0.2, 1.0)),  # type: ignore[misc]
        TypeError,
        ["positional"],
    ),
    # distributed
    (
        "unshuffle index of floats",
        lambda: batch_unshuffle(q8, torch.arange(4.0)),
        TypeError,
        ["idx_unshuffle", "long tensor returned by batch_shuffle", "got torch.float32"],
    ),
    (
        "unshuffle index of ints",
        lambda: batch_unshuffle(q8, torch.arange(4, dtype=torch.int32)),
        TypeError,
        ["idx_unshuffle", "got torch.int32"],
    ),
    (
        "unshuffle index as a list",
        lambda: batch_unshuffle(q8, [0, 1, 2, 3]),  # type: ignore[arg-type]
        TypeError,
        ["idx_unshuffle", "got list"],
    ),
    # convert
    (
        "convert the momentum encoder by another name",
        lambda: backbone_state_dict(nn.Linear(2, 2), encoder="momentum"),  # type: ignore[arg-type]
        ValueError,
        ["encoder", "'query' or 'key'", "'momentum'"],
    ),
    (
        "convert to an unknown library",
        lambda: backbone_state_dict(nn.Linear(2, 2), to="onnx"),  # type: ignore[arg-type]
        ValueError,
        ["to must be", "'detectron2'", "'onnx'"],
    ),
    (
        "convert with a prefix that is no str",
        lambda: backbone_state_dict(nn.Linear(2, 2), prefix=1),  # type: ignore[arg-type]
        TypeError,
        ["prefix", "str", "int"],
    ),
]


@pytest.mark.parametrize(
    ("call", "error", "fragments"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_is_reported_clearly(
    call: Callable[[], object], error: type[Exception], fragments: list[str]
) -> None:
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def _vit() -> nn.Module:
    from torchvision.models import VisionTransformer

    return VisionTransformer(32, 8, 1, 2, 16, 16)


# (flag, a call taking its value): Any, since wrong types are passed on purpose
FLAGS: list[tuple[str, Callable[[Any], object]]] = [
    ("normalize", lambda v: mc.KeyQueue(8, 4, normalize=v)),
    ("gather", lambda v: mc.KeyQueue(8, 4, gather=v)),
    ("normalize", lambda v: mc.info_nce(q8, k8, normalize=v)),
    ("normalize", lambda v: mc.InfoNCE(normalize=v)),
    ("gather", lambda v: mc.symmetric_contrastive_loss(q8, q8, k8, k8, gather=v)),
    ("gather", lambda v: mc.SymmetricContrastiveLoss(gather=v)),
    ("last_bn", lambda v: mc.moco_v3_predictor(8, hidden_dim=8, last_bn=v)),
    ("cls_token", lambda v: sincos_position_embedding(2, 2, 8, cls_token=v)),
    ("reinit", lambda v: freeze_patch_embedding(_vit(), reinit=v)),
    ("antialias", lambda v: MoCoV2Augment(32, antialias=v)),
    ("compile", lambda v: MoCoV2Augment(32, compile=v)),
    (
        "grayscale_first",
        lambda v: mc.augment.TwoViewAugment(ViewRecipe(grayscale_first=v), ViewRecipe()),
    ),
    (
        "antialias",
        lambda v: AF.resized_crop(
            torch.zeros(1, 3, 8, 8), torch.tensor([[0, 0, 4, 4]]), 4, antialias=v
        ),
    ),
]


@pytest.mark.parametrize(("name", "build"), FLAGS, ids=[f"{i}-{f[0]}" for i, f in enumerate(FLAGS)])
def test_a_flag_is_a_bool_not_anything_truthy(name: str, build: Callable[[Any], object]) -> None:
    """normalize="no" used to mean True: every flag was passed through bool()."""
    build(True)
    build(False)
    for wrong in ("no", 0, None):
        with pytest.raises(TypeError, match=rf"{name} must be True or False, got"):
            build(wrong)
