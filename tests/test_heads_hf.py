"""``strip_classifier`` on Hugging Face ``transformers`` vision models (tiny random
configs): features are what the model's own classifier reads, as ``(N, C)`` tensors."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from momentum_contrast import MomentumEncoder, info_nce, moco_v2_head, strip_classifier

transformers = pytest.importorskip("transformers")

VIT = {
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 37,
    "image_size": 32,
    "patch_size": 8,
}


def _resnet() -> nn.Module:
    config = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=5
    )
    return transformers.ResNetForImageClassification(config)


def _vit() -> nn.Module:
    return transformers.ViTForImageClassification(transformers.ViTConfig(num_labels=5, **VIT))


def _convnext() -> nn.Module:
    config = transformers.ConvNextConfig(
        hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=5
    )
    return transformers.ConvNextForImageClassification(config)


@pytest.mark.parametrize(
    ("build", "want_dim"),
    [(_resnet, 16), (_vit, 32), (_convnext, 16)],
    ids=["resnet", "vit", "convnext"],
)
def test_features_are_what_the_classifier_reads(build: Any, want_dim: int) -> None:
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        logits = model(x).logits  # (3, 5): the model's own path to its classifier
        features, dim = strip_classifier(model)
        f = features(x)
    assert isinstance(f, torch.Tensor) and dim == want_dim and f.shape == (3, want_dim)
    classifier = model.classifier
    head = classifier[-1] if isinstance(classifier, nn.Sequential) else classifier
    torch.testing.assert_close(head(f), logits, rtol=0, atol=1e-6)
    assert model(x).logits.shape == (3, 5)  # the model itself is left as it was


def test_a_base_model_with_a_pooler_gives_the_pooled_output() -> None:
    model = transformers.ViTModel(transformers.ViTConfig(**VIT)).eval()
    x = torch.randn(2, 3, 32, 32)
    features, dim = strip_classifier(model)
    with torch.no_grad():
        torch.testing.assert_close(features(x), model(x).pooler_output, rtol=0, atol=0)
    assert dim == 32


def test_moco_pieces_train_on_a_hugging_face_backbone() -> None:
    torch.manual_seed(0)
    backbone, dim = strip_classifier(_resnet())
    online = nn.Sequential(backbone, moco_v2_head(dim, out_dim=8))
    key = MomentumEncoder(online, momentum=0.9)
    opt = torch.optim.SGD(online.parameters(), lr=0.1)
    x = torch.randn(4, 3, 32, 32)
    before = {n: p.clone() for n, p in key.key_encoder.named_parameters()}
    q = nn.functional.normalize(online(x), dim=1)
    with torch.no_grad():
        k = nn.functional.normalize(key(x.flip(3)), dim=1)
    loss = info_nce(q, k, torch.nn.functional.normalize(torch.randn(16, 8), dim=1))
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    key.update()
    online_now = dict(online.named_parameters())
    for n, p in key.key_encoder.named_parameters():  # key = 0.9 key + 0.1 online
        want = 0.9 * before[n] + 0.1 * online_now[n].detach()
        torch.testing.assert_close(p, want, rtol=1e-6, atol=1e-7)


def test_a_wrong_feature_size_is_named() -> None:
    from momentum_contrast._hf import HFFeatures

    base = transformers.ViTModel(transformers.ViTConfig(**VIT), add_pooling_layer=False)
    with pytest.raises(ValueError, match="ViTModel returned 32 features, expected 64"):
        HFFeatures(base, 64)(torch.randn(1, 3, 32, 32))
