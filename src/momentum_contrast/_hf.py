"""Hugging Face ``transformers`` vision models as feature extractors (private).

They return a ``ModelOutput`` (or a tuple), not a tensor; MoCo's heads and losses take
``(N, C)`` tensors. [`HFFeatures`][] wraps the base model (the classifier dropped) and
returns its pooled features. ``transformers`` is never imported here.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import torch
from torch import nn

# the flags of every forward (see HFFeatures); hidden states would be kept until the end
_CALL_FLAGS = {"return_dict": True, "output_hidden_states": False, "output_attentions": False}


class HFFeatures(nn.Module):
    """A ``transformers`` vision base model returning ``(N, C)`` features: its
    ``pooler_output`` when it has a pooling pooler (average pooling, the class token after
    its norm), else the class token of ``last_hidden_state`` (ViT, DeiT: what their
    classifier reads; a learned ``dense`` + tanh pooler is then left out of this module,
    not of the model), the mean of its tokens when it has no class token, or the spatial
    mean of a ``(N, C, H, W)`` map. The base model is called with ``return_dict=True`` and
    without hidden states or attention maps, whatever its config asks for (``return_dict``
    or ``output_*``), when its ``forward`` takes these flags.

    Args:
        model: a ``transformers`` base model (``ResNetModel``, ``ViTModel``, ...).
        dim: the feature size ``C`` it returns (checked at every forward, on the host).
    """

    def __init__(self, model: nn.Module, dim: int) -> None:
        super().__init__()
        self.use_pooler = not isinstance(
            getattr(getattr(model, "pooler", None), "dense", None), nn.Linear
        )
        if not self.use_pooler:  # a view of the model without it: its parameters would get
            # no gradient, which DistributedDataParallel refuses at the second step
            model = copy.copy(model)
            model._modules = {**model._modules, "pooler": None}
        self.model = model
        self.dim = dim
        embeddings = getattr(model, "embeddings", None)
        self.class_token = getattr(embeddings, "cls_token", None) is not None
        try:  # the flags of _CALL_FLAGS that model.forward takes (by name or **kwargs)
            params = dict(inspect.signature(model.forward).parameters)
        except (TypeError, ValueError):  # no signature to read: the model's own defaults
            params = {}
        kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        self.flags = {k: v for k, v in _CALL_FLAGS.items() if kwargs or k in params}

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` images -> ``(N, C)`` features."""
        out: Any = self.model(pixel_values=pixel_values, **self.flags)
        if isinstance(out, tuple):  # a forward without return_dict, its config's set False
            # (last_hidden_state, pooler_output, ...) without the None fields: a second item
            # that is no tensor is the tuple of hidden states or attention maps, not a pooling
            second = out[1] if len(out) > 1 else None
            last, pooled = out[0], second if isinstance(second, torch.Tensor) else None
        else:
            last, pooled = out.last_hidden_state, getattr(out, "pooler_output", None)
        features: torch.Tensor
        if pooled is not None and self.use_pooler:
            features = pooled.flatten(1)  # (N, C, 1, 1) for CNNs -> (N, C)
        elif last.dim() == 4:
            features = last.mean(dim=(2, 3))  # (N, C, H, W) -> (N, C)
        elif self.class_token:
            features = last[:, 0]  # (N, L, C) -> the class token (N, C)
        else:
            features = last.mean(dim=1)  # (N, L, C) -> the mean token (N, C)
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise ValueError(
                f"{type(self.model).__name__} gave features of shape {tuple(features.shape)}, "
                f"expected (N, {self.dim}) from its config; build the feature extractor yourself"
            )
        return features

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


def hf_features(model: nn.Module) -> tuple[nn.Module, int] | None:
    """``(HFFeatures(base model), C)`` for a ``transformers`` model, else ``None``."""
    if not hasattr(model, "config") or not any(  # a user's subclass counts too
        c.__module__.startswith("transformers.") for c in type(model).__mro__
    ):
        return None
    config: Any = model.config
    name = type(model).__name__
    # ViTMAE drops a random mask_ratio of its patches at every forward; Hiera's config holds a
    # mask_ratio too, but only its MAE pre-training model (is_mae=True in its embeddings) masks
    modes = [m.is_mae for m in model.modules() if isinstance(getattr(m, "is_mae", None), bool)]
    if (getattr(config, "mask_ratio", 0) or 0) > 0 and (not modes or any(modes)):
        raise TypeError(
            f"strip_classifier: {name} masks a random {config.mask_ratio:.0%} of the patches "
            "at every forward (mask_ratio), in eval() too; load it with mask_ratio=0.0"
        )
    base = getattr(model, "base_model", model)
    # CNNs: MobileViT, ResNet, ConvNeXt
    sizes = (getattr(config, name, None) for name in ("neck_hidden_sizes", "hidden_sizes"))
    hidden_size = getattr(config, "hidden_size", None)  # transformers (ViT, DeiT, Swin)
    dim = next((s[-1] for s in sizes if isinstance(s, (list, tuple)) and s), hidden_size)
    if not isinstance(dim, int) or not isinstance(base, nn.Module):
        raise TypeError(
            f"strip_classifier: cannot tell the feature size of {name} from its config (no "
            "hidden_sizes or hidden_size); build the feature extractor yourself and pass it "
            "with its output size"
        )
    return HFFeatures(base, dim), dim
