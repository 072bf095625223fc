"""``strip_classifier`` on Hugging Face ``transformers`` vision models (tiny random
configs): features are what the model's own classifier reads, as ``(N, C)`` tensors."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from momentum_contrast import MomentumEncoder, info_nce, moco_v2_head, strip_classifier

transformers = pytest.importorskip("transformers")
# the bases of the subclasses below: mypy resolves no class through importorskip's value
ViTForImageClassification: Any = transformers.ViTForImageClassification
ViTModel: Any = transformers.ViTModel

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


def _segformer() -> nn.Module:  # a (N, C, H, W) last_hidden_state, no pooler
    config = transformers.SegformerConfig(
        hidden_sizes=[8, 8, 8, 16], num_encoder_blocks=4, depths=[1, 1, 1, 1],
        num_attention_heads=[1, 1, 1, 1], decoder_hidden_size=8, num_labels=5,
    )  # fmt: skip
    return transformers.SegformerForImageClassification(config)


def _ijepa() -> nn.Module:  # tokens without a class token: the classifier reads their mean
    return transformers.IJepaForImageClassification(transformers.IJepaConfig(num_labels=5, **VIT))


class MyViT(ViTForImageClassification):  # a user's subclass, defined here
    pass


@pytest.mark.parametrize(
    ("build", "want_dim"),
    [(_resnet, 16), (_vit, 32), (_convnext, 16), (_segformer, 16), (_ijepa, 32)],
    ids=["resnet", "vit", "convnext", "segformer", "ijepa"],
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
    torch.testing.assert_close(head(f), logits, rtol=0, atol=1e-5)
    assert model(x).logits.shape == (3, 5)  # the model itself is left as it was


def test_a_learned_pooler_is_not_used_the_class_token_is() -> None:
    # ViTModel's pooler is dense + tanh over the class token, untrained in classification
    # checkpoints: the features are the class token, as ViTForImageClassification reads it
    model = transformers.ViTModel(transformers.ViTConfig(**VIT)).eval()
    x = torch.randn(2, 3, 32, 32)
    features, dim = strip_classifier(model)
    with torch.no_grad():
        out = model(x)
        f = features(x)
    torch.testing.assert_close(f, out.last_hidden_state[:, 0], rtol=0, atol=0)
    assert not torch.allclose(f, out.pooler_output) and dim == 32
    # the unused pooler is left out of the features (its parameters would get no gradient)
    # but not out of the model, which still gives its pooler_output
    assert not [n for n, _ in features.named_parameters() if "pooler" in n]
    assert model.pooler is not None and out.pooler_output is not None


def scenario_vit_model_under_ddp() -> dict[str, Any]:
    torch.manual_seed(0)  # the same model on every rank
    features, dim = strip_classifier(transformers.ViTModel(transformers.ViTConfig(**VIT)))
    online = nn.Sequential(features, moco_v2_head(dim, hidden_dim=16, out_dim=8))
    ddp = nn.parallel.DistributedDataParallel(online)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    torch.manual_seed(1 + torch.distributed.get_rank())
    losses = []
    for _ in range(3):  # DDP refused the second step while the pooler was in the model
        loss = info_nce(ddp(torch.randn(4, 3, 32, 32)), torch.randn(4, 8))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    weight = online.get_parameter("1.0.weight")  # online[1][0].weight, typed
    return {"losses": losses, "weight": weight.detach().clone()}


def test_a_vit_model_trains_under_ddp(tmp_path: Path) -> None:
    from _dist_workers import launch

    rank0, rank1 = launch(scenario_vit_model_under_ddp, 2, tmp_path)
    assert all(math.isfinite(v) for v in rank0["losses"] + rank1["losses"])
    torch.testing.assert_close(rank0["weight"], rank1["weight"], rtol=0, atol=0)  # in sync


def test_tuple_outputs_and_subclasses_are_understood() -> None:
    torch.manual_seed(0)
    model = MyViT(transformers.ViTConfig(num_labels=5, **VIT)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(x).logits
        model.config.return_dict = False  # the model now returns tuples
        features, _ = strip_classifier(model)
        torch.testing.assert_close(model.classifier(features(x)), want, rtol=0, atol=1e-6)


def test_random_patch_masking_is_refused() -> None:
    config = transformers.ViTMAEConfig(**VIT)  # mask_ratio 0.75 by default
    with pytest.raises(TypeError, match=r"masks a random 75% of the patches.*mask_ratio=0\.0"):
        strip_classifier(transformers.ViTMAEModel(config))
    unmasked = transformers.ViTMAEModel(transformers.ViTMAEConfig(mask_ratio=0.0, **VIT))
    features, dim = strip_classifier(unmasked.eval())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # the patches are still shuffled: the same up to rounding
        torch.testing.assert_close(features(x), features(x), rtol=1e-5, atol=1e-5)
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
    match = r"ViTModel gave features of shape \(1, 32\), expected \(N, 64\)"
    with pytest.raises(ValueError, match=match):
        HFFeatures(base, 64)(torch.randn(1, 3, 32, 32))


def _vit_no_pooler() -> nn.Module:
    config = transformers.ViTConfig(attn_implementation="eager", **VIT)
    return transformers.ViTModel(config, add_pooling_layer=False)


def _vit_eager() -> nn.Module:
    config = transformers.ViTConfig(num_labels=5, attn_implementation="eager", **VIT)
    return transformers.ViTForImageClassification(config)


def _segformer_eager() -> nn.Module:
    model: Any = _segformer()  # a transformers model (transformers is untyped here)
    model.set_attn_implementation("eager")
    return model


class PlainCallViT(ViTModel):  # a forward without the flags: its config decides
    def forward(self, pixel_values: torch.Tensor) -> Any:
        return super().forward(pixel_values=pixel_values)


def _vit_plain_call() -> nn.Module:
    config = transformers.ViTConfig(attn_implementation="eager", **VIT)
    return PlainCallViT(config, add_pooling_layer=False)


HIERA = {
    "embed_dim": 8, "depths": [1, 1], "num_heads": [1, 1], "image_size": [32, 32],
    "patch_size": [3, 3], "patch_stride": [2, 2], "patch_padding": [1, 1],
    "masked_unit_size": [4, 4], "num_query_pool": 1, "query_stride": [2, 2], "mlp_ratio": 2.0,
}  # fmt: skip


def _hiera() -> nn.Module:  # mask_ratio 0.6 in its config, for the MAE model only
    config = transformers.HieraConfig(num_labels=5, attn_implementation="eager", **HIERA)
    return transformers.HieraForImageClassification(config)


@pytest.mark.parametrize(
    "build",
    [_vit_no_pooler, _vit_eager, _resnet, _segformer_eager, _hiera, _vit_plain_call],
    ids=["vit-no-pooler", "vit-classifier", "resnet", "segformer", "hiera", "vit-plain-call"],
)
@pytest.mark.parametrize(
    "flags",
    [
        {"return_dict": False},
        {"return_dict": False, "output_hidden_states": True},
        {"return_dict": False, "output_attentions": True},
        {"output_hidden_states": True, "output_attentions": True},
    ],
    ids=["tuple", "tuple-hidden-states", "tuple-attentions", "dict-hidden-attentions"],
)
def test_the_features_do_not_depend_on_the_output_flags(build: Any, flags: dict[str, bool]) -> None:
    # return_dict=False with hidden states or attentions and no pooler gave the tuple
    # (last_hidden_state, hidden_states, ...): hidden_states was taken for the pooled output
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(2, 3, 32, 32)
    features, dim = strip_classifier(model)
    with torch.no_grad():
        want = features(x)
        for name, value in flags.items():
            setattr(model.config, name, value)
        got = features(x)
    assert want.shape == (2, dim)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_hiera_classification_is_accepted_its_mae_pre_training_refused() -> None:
    torch.manual_seed(0)
    config = transformers.HieraConfig(num_labels=5, **HIERA)
    assert config.mask_ratio == 0.6  # read by the pre-training model only
    model = transformers.HieraForImageClassification(config).eval()
    x = torch.randn(3, 3, 32, 32)
    features, dim = strip_classifier(model)
    with torch.no_grad():
        logits = model(x).logits
        f = features(x)
    assert dim == 16 and f.shape == (3, 16)  # embed_dim 8, doubled once
    torch.testing.assert_close(model.classifier(f), logits, rtol=0, atol=1e-5)
    with torch.no_grad():  # no random masking: the same features twice
        torch.testing.assert_close(features(x), f, rtol=0, atol=0)
    mae = {"decoder_hidden_size": 8, "decoder_depth": 1, "decoder_num_heads": 1}
    pre_training = transformers.HieraForPreTraining(transformers.HieraConfig(**HIERA, **mae))
    with pytest.raises(TypeError, match=r"HieraForPreTraining masks a random 60% of the patches"):
        strip_classifier(pre_training)
