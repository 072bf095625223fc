"""Take the pre-trained backbone out of a MoCo checkpoint, for torchvision, timm or
detectron2; and load the MoCo authors' checkpoints into this library's pieces.

Command line::

    python -m momentum_contrast.convert SRC DST --to torchvision|timm|detectron2 [--encoder key]

``SRC`` is a checkpoint of this project's example scripts (one process or DDP), a MoCo
v1/v2 or v3 checkpoint released by the authors (ResNet or ViT), or a plain state dict.
The query encoder is taken by default (as the authors' conversion scripts), never its
MLP head, projector or predictor.
"""

from __future__ import annotations

import argparse
import pickle
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from momentum_contrast._backbone_names import (
    FAMILIES,
    RENAMES,
    LayoutError,
    State,
    find_backbones,
    split_backbone,
)
from momentum_contrast._checkpoint_sources import (
    encoder_state,
    load_strict,
    read_checkpoint,
    source_kind,
    strip_prefix,
)
from momentum_contrast.encoder import MomentumEncoder, unwrap_model
from momentum_contrast.queue import KeyQueue

__all__ = ["LayoutError", "backbone_state_dict", "load_official_checkpoint", "main"]

Target = Literal["torchvision", "timm", "detectron2"]
Source = str | Path | Mapping[str, Any] | nn.Module


def _encoder_of(source: Source, encoder: str) -> tuple[State, str]:
    """The whole encoder's state (names unprefixed) and how to name the source in errors."""
    if isinstance(source, MomentumEncoder):
        model = source.online if encoder == "query" else source.key_encoder
        return dict(model.state_dict()), f"the MomentumEncoder's {encoder} encoder"
    if isinstance(source, nn.Module):
        if encoder == "key":
            raise ValueError("encoder='key' needs a MomentumEncoder or a checkpoint")
        return dict(unwrap_model(source).state_dict()), type(source).__name__
    ckpt = read_checkpoint(source) if isinstance(source, (str, Path)) else source
    what = str(source) if isinstance(source, (str, Path)) else "the checkpoint"
    return encoder_state(ckpt, encoder), f"{what} ({encoder} encoder)"


def backbone_state_dict(
    source: Source, *, encoder: Literal["query", "key"] = "query", to: Target = "torchvision"
) -> dict[str, torch.Tensor]:
    """The backbone of a MoCo model or checkpoint, named as ``to`` names it, without head.

    ``to="torchvision"`` loads into ``torchvision.models.resnet50()`` (or a torchvision
    ``VisionTransformer``) with only the classifier (``fc.*`` / ``heads.*``) missing;
    ``to="timm"`` into ``timm.create_model(..., num_classes=0)``; ``to="detectron2"``
    (ResNets) gives the names of the MoCo authors' detectron2 conversion.

    Args:
        source: a checkpoint path or loaded dict (see the module docstring), a
            [`MomentumEncoder`][momentum_contrast.MomentumEncoder] (query = its online
            model, key = its key encoder), or a model such as
            ``nn.Sequential(backbone, head)``.
        encoder: ``"query"`` (default, as the authors) or ``"key"`` (the momentum encoder).
        to: the naming of the result.

    Returns:
        ``{name: tensor}``, the tensors shared with ``source`` (clone before editing).

    Raises:
        LayoutError: (a ``ValueError``) no backbone found, an unknown layout, or a target
            that cannot hold this backbone, with a one-line message.

    Examples:
        >>> import torch, torchvision
        >>> from momentum_contrast import MomentumEncoder, moco_v2_head, strip_classifier
        >>> from momentum_contrast.convert import backbone_state_dict
        >>> backbone, dim = strip_classifier(torchvision.models.resnet18())
        >>> key_encoder = MomentumEncoder(torch.nn.Sequential(backbone, moco_v2_head(dim)))
        >>> state = backbone_state_dict(key_encoder, encoder="key")
        >>> torchvision.models.resnet18().load_state_dict(state, strict=False)
        _IncompatibleKeys(missing_keys=['fc.weight', 'fc.bias'], unexpected_keys=[])
    """
    if encoder not in ("query", "key"):
        raise ValueError(f"encoder must be 'query' or 'key', got {encoder!r}")
    if to not in ("torchvision", "timm", "detectron2"):
        raise ValueError(f"to must be 'torchvision', 'timm' or 'detectron2', got {to!r}")
    state, what = _encoder_of(source, encoder)
    family, backbone, _ = split_backbone(state, what)
    rename = RENAMES.get((family, to))
    if rename is None:
        raise LayoutError(f"{what} is a {family} backbone: {to} takes ResNets only")
    return rename(backbone)


def load_official_checkpoint(
    source: str | Path | Mapping[str, Any],
    model: nn.Module,
    key_encoder: MomentumEncoder,
    *,
    queue: KeyQueue | None = None,
    predictor: nn.Module | None = None,
) -> dict[str, Any]:
    """Load a MoCo authors' checkpoint into this library's pieces, to continue training.

    v1/v2: ``model`` is ``nn.Sequential(backbone, moco_v2_head(dim))`` (or the v1 head),
    the queue is transposed from the authors' ``(dim, K)`` to ``(K, dim)``. v3: ``model``
    is ``nn.Sequential(backbone, moco_v3_projector(...))`` (what the key encoder
    follows) and ``predictor`` the ``moco_v3_predictor``. The backbone is a torchvision
    ResNet (``strip_classifier(resnet50())``) or a timm ViT.

    Args:
        source: path or loaded dict of the authors' checkpoint.
        model: the query encoder (backbone and head / projector), loaded in place.
        key_encoder: a ``MomentumEncoder`` of ``model``, loaded in place.
        queue: v1/v2 only: a ``KeyQueue(K, dim)``, loaded in place.
        predictor: v3 only: the predictor, loaded in place.

    Returns:
        ``{"kind", "epoch", "arch"}`` of the checkpoint (``"official_v1v2"`` or
        ``"official_v3"``).

    Raises:
        LayoutError: not an authors' checkpoint, or one that does not fit these pieces
            (another architecture, head or queue size), with a one-line message.

    Examples:
        A stand-in for ``torch.load("moco_v2_800ep_pretrain.pth.tar", weights_only=True)``,
        with the authors' key names around a ResNet-18:

        >>> import torch, torchvision
        >>> from torch import nn
        >>> from momentum_contrast import KeyQueue, MomentumEncoder, moco_v2_head, strip_classifier
        >>> from momentum_contrast.convert import load_official_checkpoint
        >>> def resnet18_v2():
        ...     return nn.Sequential(strip_classifier(torchvision.models.resnet18())[0],
        ...                          moco_v2_head(512))
        >>> def authors_names(prefix, model):  # backbone at the top, the MLP head at fc
        ...     return {prefix + (k[2:] if k.startswith("0.") else "fc." + k[2:]): v
        ...             for k, v in model.state_dict().items()}
        >>> state = {**authors_names("module.encoder_q.", resnet18_v2()),
        ...          **authors_names("module.encoder_k.", resnet18_v2()),
        ...          "module.queue": nn.functional.normalize(torch.randn(128, 4096), dim=0),
        ...          "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
        >>> ckpt = {"epoch": 200, "arch": "resnet18", "state_dict": state}
        >>> model = resnet18_v2()
        >>> key_encoder, queue = MomentumEncoder(model), KeyQueue(4096, 128)
        >>> load_official_checkpoint(ckpt, model, key_encoder, queue=queue)
        {'kind': 'official_v1v2', 'epoch': 200, 'arch': 'resnet18'}
        >>> torch.equal(queue.keys, state["module.queue"].T)  # (dim, K) -> (K, dim)
        True
    """
    ckpt = read_checkpoint(source) if isinstance(source, (str, Path)) else source
    kind = source_kind(ckpt)
    if kind not in ("official_v1v2", "official_v3"):
        raise LayoutError(f"not a MoCo authors' checkpoint (this is a {kind} checkpoint)")
    state = ckpt["state_dict"]
    for encoder, target in (("query", unwrap_model(model)), ("key", key_encoder.key_encoder)):
        children = list(target.children())
        if len(children) != 2:
            raise LayoutError(f"the {encoder} model must be nn.Sequential(backbone, head)")
        family, backbone, head = split_backbone(
            encoder_state(ckpt, encoder), f"the {encoder} encoder"
        )
        ours = find_backbones(children[0].state_dict())
        naming = "timm" if ours and ours[0][1] == "vit_timm" else "torchvision"
        rename = RENAMES.get((family, naming), dict)
        head_prefix = FAMILIES[family][1]
        staged = {f"0.{k}": v for k, v in rename(backbone).items()}
        staged |= {f"1.{k[len(head_prefix) :]}": v for k, v in head.items()}
        load_strict(
            target, staged, f"the {ckpt.get('arch') or family} checkpoint's {encoder} encoder"
        )
    if kind == "official_v1v2":
        if queue is None:
            raise ValueError("a MoCo v1/v2 checkpoint has a queue: pass queue=KeyQueue(K, dim)")
        keys = state["module.queue"].T  # (dim, K) -> (K, dim)
        ptr = state["module.queue_ptr"].reshape(())
        load_strict(
            queue,
            {"keys": keys, "ptr": ptr, "length": torch.tensor(keys.shape[0])},
            "the checkpoint's queue",
        )
    else:
        if predictor is None:
            raise ValueError("a MoCo v3 checkpoint has a predictor: pass predictor=...")
        load_strict(
            predictor, strip_prefix(state, "module.predictor."), "the checkpoint's predictor"
        )
    return {"kind": kind, "epoch": ckpt.get("epoch"), "arch": ckpt.get("arch")}


def _save(state: State, dst: Path, to: Target) -> None:
    if to == "detectron2":  # the layout detectron2's checkpointer reads, as the authors'
        try:
            arrays = {k: v.detach().cpu().numpy() for k, v in state.items()}
        except RuntimeError as e:  # torch without NumPy
            raise LayoutError(f"--to detectron2 writes NumPy arrays: install numpy ({e})") from None
        payload = {"model": arrays, "__author__": "momentum_contrast", "matching_heuristics": True}
        with open(dst, "wb") as f:
            pickle.dump(payload, f)
    else:
        torch.save({k: v.detach().clone() for k, v in state.items()}, dst)


def main(argv: list[str] | None = None) -> int:
    """The command line, ``python -m momentum_contrast.convert SRC DST --to ...``.

    Args:
        argv: the arguments (``sys.argv[1:]`` when ``None``).

    Returns:
        The exit status: 0, or 2 after one line ``error: ...`` on standard error.

    Examples:
        >>> from momentum_contrast.convert import main
        >>> main(["no_such_checkpoint.pt", "backbone.pth", "--to", "torchvision"])
        2
    """
    p = argparse.ArgumentParser(
        prog="python -m momentum_contrast.convert",
        description="Write the pre-trained backbone of a MoCo checkpoint for another library.",
    )
    p.add_argument(
        "src", help="checkpoint: this project's, the MoCo authors' v1/v2/v3, or a state dict"
    )
    p.add_argument("dst", help="output file (.pth for torchvision/timm, .pkl for detectron2)")
    p.add_argument("--to", required=True, choices=("torchvision", "timm", "detectron2"))
    p.add_argument(
        "--encoder",
        default="query",
        choices=("query", "key"),
        help="the query encoder (default, as the authors) or the momentum encoder",
    )
    args = p.parse_args(argv)
    try:
        state = backbone_state_dict(args.src, encoder=args.encoder, to=args.to)
        _save(state, Path(args.dst), args.to)
    except (LayoutError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.dst}: {len(state)} tensors of the {args.encoder} encoder's backbone "
        f"for {args.to}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
