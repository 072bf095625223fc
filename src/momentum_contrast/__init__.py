"""MoCo v1, v2 and v3 (Momentum Contrast) as small, typed PyTorch modules."""

from momentum_contrast.encoder import MomentumEncoder, cosine_momentum
from momentum_contrast.heads import (
    build_mlp,
    moco_v1_head,
    moco_v2_head,
    moco_v3_predictor,
    moco_v3_projector,
    strip_classifier,
)
from momentum_contrast.losses import (
    InfoNCE,
    SymmetricContrastiveLoss,
    info_nce,
    symmetric_contrastive_loss,
)
from momentum_contrast.queue import KeyQueue

__version__ = "0.3.0"
"""The package version (PEP 440).

Examples:
    >>> import momentum_contrast
    >>> momentum_contrast.__version__
    '0.3.0'
"""

__all__ = [
    "InfoNCE",
    "KeyQueue",
    "MomentumEncoder",
    "SymmetricContrastiveLoss",
    "__version__",
    "build_mlp",
    "cosine_momentum",
    "info_nce",
    "moco_v1_head",
    "moco_v2_head",
    "moco_v3_predictor",
    "moco_v3_projector",
    "strip_classifier",
    "symmetric_contrastive_loss",
]
