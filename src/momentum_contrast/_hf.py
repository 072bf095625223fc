"""Hugging Face ``transformers`` vision models as feature extractors (private).

They return a ``ModelOutput`` (a dataclass of tensors), not a tensor; MoCo's heads and
losses take ``(N, C)`` tensors. [`HFFeatures`][] wraps the base model (the classifier
dropped) and returns its pooled features. ``transformers`` is never imported here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["HFFeatures", "hf_features"]


def _is_transformers_model(model: nn.Module) -> bool:
    return type(model).__module__.startswith("transformers.") and hasattr(model, "config")


class HFFeatures(nn.Module):
    """A ``transformers`` vision base model returning ``(N, C)`` features: its
    ``pooler_output`` (flattened) when it has one, else the first token of
    ``last_hidden_state`` (the class token of a ViT, as its classifier reads it).

    Args:
        model: a ``transformers`` base model (``ResNetModel``, ``ViTModel``, ...).
        dim: the feature size ``C`` it returns (checked at every forward, on the host).
    """

    def __init__(self, model: nn.Module, dim: int) -> None:
        super().__init__()
        self.model = model
        self.dim = dim

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` images -> ``(N, C)`` features."""
        out: Any = self.model(pixel_values=pixel_values)
        pooled = getattr(out, "pooler_output", None)
        # (N, C, 1, 1) for CNNs -> (N, C); without a pooler: the class token of (N, L, C)
        features: torch.Tensor = (
            pooled.flatten(1) if pooled is not None else out.last_hidden_state[:, 0]
        )
        if features.shape[1] != self.dim:
            raise ValueError(
                f"{type(self.model).__name__} returned {features.shape[1]} features, "
                f"expected {self.dim} from its config; build the feature extractor yourself"
            )
        return features

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


def hf_features(model: nn.Module) -> tuple[nn.Module, int] | None:
    """``(HFFeatures(base model), C)`` for a ``transformers`` model, else ``None``."""
    if not _is_transformers_model(model):
        return None
    config: Any = model.config
    base = getattr(model, "base_model", model)
    sizes = getattr(config, "hidden_sizes", None)  # CNNs (ResNet, ConvNeXt, RegNet)
    dim = sizes[-1] if isinstance(sizes, (list, tuple)) and sizes else None
    if dim is None:
        dim = getattr(config, "hidden_size", None)  # transformers (ViT, DeiT, Swin)
    if getattr(base, "pooler", None) is not None and getattr(config, "pooler_output_size", None):
        dim = config.pooler_output_size
    if not isinstance(dim, int) or not isinstance(base, nn.Module):
        raise TypeError(
            f"strip_classifier: cannot tell the feature size of {type(model).__name__} from "
            "its config (no hidden_sizes or hidden_size); build the feature extractor "
            "yourself and pass it with its output size"
        )
    return HFFeatures(base, dim), dim
