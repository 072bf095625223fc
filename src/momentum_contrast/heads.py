"""Projection and prediction heads of MoCo v1, v2 and v3, and backbone surgery."""

from __future__ import annotations

import itertools

from torch import nn

from momentum_contrast._checks import check_bool, check_positive_int
from momentum_contrast._hf import hf_features

__all__ = [
    "build_mlp",
    "moco_v1_head",
    "moco_v2_head",
    "moco_v3_predictor",
    "moco_v3_projector",
    "strip_classifier",
]

_CLASSIFIER_NAMES = ("fc", "head", "heads", "classifier")


def _is_dropout(named: tuple[str, nn.Module]) -> bool:
    return isinstance(named[1], nn.Dropout)


def build_mlp(
    in_dim: int, *, hidden_dim: int, out_dim: int, num_layers: int, last_bn: bool = True
) -> nn.Sequential:
    """MLP of MoCo v3: ``[Linear → BatchNorm1d → ReLU] * (num_layers - 1) → Linear``.

    Every ``Linear`` is bias-free (BatchNorm follows it). With ``last_bn`` the
    last ``Linear`` is followed by a ``BatchNorm1d(affine=False)``, as in the
    paper's projector (and ViT predictor). Every argument after ``in_dim`` is
    keyword-only, with the same names as the other head builders.

    Args:
        in_dim: input features.
        hidden_dim: width of the hidden layers.
        out_dim: output features.
        num_layers: number of ``Linear`` layers, ``>= 1``.
        last_bn: end with a non-affine ``BatchNorm1d``.

    Returns:
        ``nn.Sequential`` mapping ``(N, in_dim)`` to ``(N, out_dim)``.

    Examples:
        >>> from momentum_contrast import build_mlp
        >>> build_mlp(2048, hidden_dim=4096, out_dim=256, num_layers=2)
        Sequential(
          (0): Linear(in_features=2048, out_features=4096, bias=False)
          (1): BatchNorm1d(4096, eps=1e-05, momentum=0.1, affine=True...)
          (2): ReLU(inplace=True)
          (3): Linear(in_features=4096, out_features=256, bias=False)
          (4): BatchNorm1d(256, eps=1e-05, momentum=0.1, affine=False...)
        )
    """
    dims = [check_positive_int("in_dim", in_dim)]
    layers = check_positive_int("num_layers", num_layers)
    dims += [check_positive_int("hidden_dim", hidden_dim)] * (layers - 1)
    dims += [check_positive_int("out_dim", out_dim)]
    check_bool("last_bn", last_bn)
    modules: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(itertools.pairwise(dims)):
        modules.append(nn.Linear(d_in, d_out, bias=False))
        if i < layers - 1:
            modules += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
        elif last_bn:
            modules.append(nn.BatchNorm1d(d_out, affine=False))
    return nn.Sequential(*modules)


def moco_v1_head(in_dim: int, *, out_dim: int = 128) -> nn.Linear:
    """MoCo v1 head: the classifier replaced by ``Linear(in_dim, out_dim)`` (with bias).

    Args:
        in_dim: the backbone's feature width.
        out_dim: the embedding width (128 in the paper); keyword-only.

    Examples:
        >>> from momentum_contrast import moco_v1_head
        >>> moco_v1_head(2048)
        Linear(in_features=2048, out_features=128, bias=True)
        >>> moco_v1_head(512, out_dim=64)
        Linear(in_features=512, out_features=64, bias=True)
    """
    return nn.Linear(check_positive_int("in_dim", in_dim), check_positive_int("out_dim", out_dim))


def moco_v2_head(
    in_dim: int, *, hidden_dim: int | None = None, out_dim: int = 128
) -> nn.Sequential:
    """MoCo v2 head: ``Linear → ReLU → Linear``, with biases (the reference v2 MLP).

    The reference widens the backbone's own ``fc`` into this MLP, so the hidden width
    is the backbone's feature width: 2048 → 2048 → 128 for a ResNet-50, 512 → 512 →
    128 for a ResNet-18. Every argument after ``in_dim`` is keyword-only (the same
    names as the other head builders), so ``moco_v2_head(2048, 128)`` is refused
    rather than read as a hidden width.

    Args:
        in_dim: the backbone's feature width.
        hidden_dim: hidden width; ``None`` (default, as the reference) uses ``in_dim``.
        out_dim: the embedding width (128 in the paper).

    Examples:
        >>> from momentum_contrast import moco_v2_head
        >>> moco_v2_head(512)
        Sequential(
          (0): Linear(in_features=512, out_features=512, bias=True)
          (1): ReLU()
          (2): Linear(in_features=512, out_features=128, bias=True)
        )
        >>> moco_v2_head(2048, out_dim=64)[2]
        Linear(in_features=2048, out_features=64, bias=True)
    """
    in_dim = check_positive_int("in_dim", in_dim)
    hidden = in_dim if hidden_dim is None else check_positive_int("hidden_dim", hidden_dim)
    return nn.Sequential(
        nn.Linear(in_dim, hidden),
        nn.ReLU(),
        nn.Linear(hidden, check_positive_int("out_dim", out_dim)),
    )


def moco_v3_projector(
    in_dim: int, *, hidden_dim: int = 4096, out_dim: int = 256, num_layers: int = 2
) -> nn.Sequential:
    """MoCo v3 projector: [`build_mlp`][] with a last non-affine BatchNorm.

    Use ``num_layers=2`` for ResNets (the default) and ``3`` for ViTs.

    Args:
        in_dim: the backbone's feature width.
        hidden_dim: width of the hidden layers (4096 in the paper); keyword-only.
        out_dim: the embedding width (256 in the paper).
        num_layers: number of ``Linear`` layers: 2 for ResNets, 3 for ViTs.

    Examples:
        >>> import torch
        >>> from momentum_contrast import moco_v3_projector
        >>> vit_projector = moco_v3_projector(768, num_layers=3)
        >>> sum(isinstance(m, torch.nn.Linear) for m in vit_projector)
        3
    """
    return build_mlp(
        in_dim, hidden_dim=hidden_dim, out_dim=out_dim, num_layers=num_layers, last_bn=True
    )


def moco_v3_predictor(
    in_dim: int = 256, *, hidden_dim: int = 4096, last_bn: bool = False
) -> nn.Sequential:
    """MoCo v3 predictor: 2-layer [`build_mlp`][] ``in_dim → hidden_dim → in_dim``.

    ``last_bn=False`` for ResNets (the default), ``True`` for ViTs, as the reference.

    Args:
        in_dim: the projector's output width (256 in the paper); also the output width.
        hidden_dim: width of the hidden layer (4096 in the paper); keyword-only.
        last_bn: end with a non-affine ``BatchNorm1d`` (ViTs).

    Examples:
        >>> import torch
        >>> from momentum_contrast import moco_v3_predictor
        >>> predictor = moco_v3_predictor()
        >>> predictor(torch.randn(4, 256)).shape
        torch.Size([4, 256])
    """
    return build_mlp(in_dim, hidden_dim=hidden_dim, out_dim=in_dim, num_layers=2, last_bn=last_bn)


def strip_classifier(model: nn.Module) -> tuple[nn.Module, int]:
    """Remove a model's classifier so it outputs features; return them and their size.

    Modifies ``model`` in place and returns it (a ``torch.compile``'d model: the model it
    compiles, the compiled one returned; for a Hugging Face model, whose feature extractor
    is a new module, that module, not compiled: compile it again). Understood:

    - timm models (anything with ``reset_classifier`` and ``num_features``):
      ``reset_classifier(0)``; the feature size is ``head_hidden_size`` where the model has
      it (the width after a pre-logits layer: 1024 for ``mobilenetv3_small_050``, whose
      ``num_features`` is 288), else ``num_features``. One built without pooling
      (``global_pool=""``: a feature map or all tokens, not ``(N, C)``) raises ``TypeError``.
      The head's dropout stays (``drop_rate``, 0.2 in ``rexnet_100`` and ``ghostnet_100``,
      0 in most): create such a model with ``drop_rate=0.0``.
    - Hugging Face ``transformers`` vision models (``ResNetForImageClassification``,
      ``ViTModel``, ...), which return a ``ModelOutput``: *not* modified; returned is a
      new module around their base model giving ``(N, C)``: its pooled output (average
      pooling; not a ``dense`` + tanh pooler), else the class token of
      ``last_hidden_state``, or the mean of its tokens or of its ``(N, C, H, W)`` map,
      whatever the config's ``return_dict`` and ``output_*`` flags (where ``transformers``
      runs with them: its 5.x ConvNext fails with ``return_dict=False``). Models that mask
      patches at random (``mask_ratio``: ViTMAE, Hiera's MAE pre-training model, not its
      classifier) are refused. (Dinov2's classifier reads the class token and the mean
      patch token, ``2C``: this gives the ``C``-wide pooled class token.)
    - models whose last child is an ``nn.Linear`` named ``fc``, ``head``,
      ``heads`` or ``classifier`` (torchvision ResNets, custom models), or an
      ``nn.Sequential`` under such a name ending in one (torchvision ViT's
      ``heads``, EfficientNet's ``classifier``): that ``Linear`` becomes ``nn.Identity``,
      and so do the ``nn.Dropout`` layers of that ``Sequential`` (EfficientNet's,
      MobileNet's, VGG's) or, where the ``Linear`` is the model's own child, those
      registered right before it (GoogLeNet's): they regularise the classifier, and in the
      key encoder, which runs in training mode, they would zero features at random.
      Auxiliary classifiers (torchvision GoogLeNet's and Inception v3's ``aux_logits``,
      whose outputs a training-mode forward returns with the features) are removed.

    Args:
        model: a classification network.

    Returns:
        ``(feature_extractor, feature_dim)``: the same ``model``, now mapping
        images to ``(N, feature_dim)`` features.

    Raises:
        TypeError: when the classifier cannot be found; build the feature
            extractor yourself and pass it with its output size instead.

    Examples:
        >>> import torch, torchvision
        >>> from momentum_contrast import moco_v2_head, strip_classifier
        >>> backbone, dim = strip_classifier(torchvision.models.resnet18())
        >>> dim
        512
        >>> encoder = torch.nn.Sequential(backbone, moco_v2_head(dim))
        >>> encoder(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 128])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(compiled := getattr(model, "_orig_mod", None), nn.Module):
        stripped, dim = strip_classifier(compiled)  # a Hugging Face model's is a new module
        return (model if stripped is compiled else stripped), dim
    from_hf = hf_features(model)
    if from_hf is not None:
        return from_hf
    reset = getattr(model, "reset_classifier", None)
    num_features = getattr(model, "num_features", None)
    if callable(reset) and isinstance(num_features, int):
        head = getattr(model, "head", None)  # ConvNeXt's pooling is the head's (a module)
        pools = (
            getattr(model, "global_pool", None),
            getattr(head, "global_pool", None),
            getattr(head, "pool_type", None),  # Hiera's, MambaOut's: a string
        )
        if any(p == "" or getattr(p, "pool_type", None) == "" for p in pools):
            raise TypeError(
                f"strip_classifier: this timm {type(model).__name__} was built with "
                'global_pool="": it gives a feature map or all tokens, not (N, C) features; '
                'build it with global_pool="avg" (or "token" for a ViT)'
            )
        reset(0)  # keeps a pre-logits layer (MobileNetV3's conv_head): head_hidden_size wide
        width = getattr(model, "head_hidden_size", None)
        return model, width if isinstance(width, int) and width > 0 else num_features
    if getattr(model, "aux_logits", None) is True:  # training-mode outputs: a named tuple
        model.aux_logits = False  # type: ignore[assignment]
        for name in ("aux1", "aux2", "AuxLogits"):  # GoogLeNet's, Inception v3's
            if isinstance(getattr(model, name, None), nn.Module):
                setattr(model, name, None)  # their forwards skip a missing one
    children = list(model.named_children())
    if children and children[-1][0] in _CLASSIFIER_NAMES:
        name, last = children[-1]
        parent: nn.Module = model
        if isinstance(last, nn.Sequential) and len(last) > 0:
            parent, (name, last) = last, list(last.named_children())[-1]
        if isinstance(last, nn.Linear):
            setattr(parent, name, nn.Identity())
            siblings = list(parent.named_children())[:-1]
            if parent is model:  # of the model's own children, the dropouts right before it
                siblings = list(itertools.takewhile(_is_dropout, reversed(siblings)))
            for child, _ in filter(_is_dropout, siblings):  # the classifier's dropout
                setattr(parent, child, nn.Identity())
            return model, last.in_features
    found = ", ".join(f"{n}: {type(m).__name__}" for n, m in children[-3:]) or "no children"
    raise TypeError(
        f"strip_classifier: cannot find the classifier of {type(model).__name__}; expected a "
        f"timm model or a last child nn.Linear named one of {', '.join(_CLASSIFIER_NAMES)} "
        f"(last children: {found}). Build the feature extractor yourself and pass it with "
        "its output size, e.g. moco_v2_head(feature_dim) on top of it."
    )
