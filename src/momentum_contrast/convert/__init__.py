"""Take the pre-trained backbone out of a MoCo checkpoint, for torchvision, timm or
detectron2; and load the MoCo authors' checkpoints into this library's pieces.

Command line::

    python -m momentum_contrast.convert SRC DST --to torchvision|timm|detectron2
        [--encoder query|key] [--prefix P] [--num-heads N] [--overwrite]

``SRC`` is a checkpoint of this project's example scripts (one process or DDP), a MoCo
v1/v2 or v3 checkpoint released by the authors (ResNet or ViT), or any dict of tensors
(a state dict, a Lightning checkpoint), searched by content. The query encoder is taken
by default (as the authors' conversion scripts), never its MLP head, projector or
predictor where they are modules beside the backbone (``nn.Sequential(backbone, head)``;
tensors registered inside the backbone's own module stay with it, for a strict load to
name: see the checkpointing guide). For a ViT, the model to build (its number of attention
heads, which the weights do not hold) is printed and stored in ``DST`` under ``"__model__"``.
"""

from momentum_contrast.convert._backbone import backbone_spec, backbone_state_dict
from momentum_contrast.convert._cli import main
from momentum_contrast.convert._official import load_official_checkpoint
from momentum_contrast.convert._sources import LayoutError, checkpoint_kind
from momentum_contrast.convert._spec import ModelSpec

__all__ = [
    "LayoutError",
    "ModelSpec",
    "backbone_spec",
    "backbone_state_dict",
    "checkpoint_kind",
    "load_official_checkpoint",
    "main",
]
