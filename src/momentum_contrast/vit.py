"""Vision Transformer helpers of MoCo v3: frozen random patch projection, fixed 2-D sin-cos
position embedding. Work on torchvision's ``VisionTransformer`` and on timm ViTs (timm is
never imported here: its models are recognised by their attributes)."""

from __future__ import annotations

import math

import torch
from einops import repeat
from torch import nn

from momentum_contrast._checks import check_bool, check_positive, check_positive_int

__all__ = ["freeze_patch_embedding", "sincos_position_embedding", "use_sincos_position_embedding"]


def freeze_patch_embedding(vit: nn.Module, *, reinit: bool = True) -> nn.Module:
    """Keep the patch projection a fixed random projection (MoCo v3's stability trick).

    With ``reinit`` (as the reference) the projection is first re-drawn uniformly in
    ``±sqrt(6 / (in_channels * patch_area + dim))`` (Xavier-uniform over the flattened patch:
    ``3 * patch_area`` for RGB, as the reference) with a zero bias. Its parameters then get
    ``requires_grad=False``. Modifies ``vit`` in place: call it before building the
    [`MomentumEncoder`][momentum_contrast.encoder.MomentumEncoder], whose key encoder is a
    copy taken then (values written later are not copied, and it would average towards them).

    Examples:
        >>> import torchvision
        >>> from momentum_contrast.vit import freeze_patch_embedding
        >>> vit = freeze_patch_embedding(torchvision.models.vit_b_16())
        >>> vit.conv_proj.weight.requires_grad
        False
    """
    proj = getattr(vit, "conv_proj", None)  # torchvision
    if proj is None:
        proj = getattr(getattr(vit, "patch_embed", None), "proj", None)  # timm
    if not isinstance(proj, nn.Conv2d):
        raise TypeError(
            f"vit must be a torchvision VisionTransformer (conv_proj) or a timm ViT "
            f"(patch_embed.proj) whose patch projection is one nn.Conv2d, got "
            f"{type(vit).__name__} with {type(proj).__name__ if proj is not None else 'none'}"
        )
    if check_bool("reinit", reinit):
        fan = proj.in_channels * math.prod(proj.kernel_size) + proj.out_channels
        bound = math.sqrt(6.0 / fan)
        with torch.no_grad():
            proj.weight.uniform_(-bound, bound)
            if proj.bias is not None:
                proj.bias.zero_()
    for p in proj.parameters():
        p.requires_grad_(False)
    return vit


def sincos_position_embedding(
    h: int, w: int, dim: int, *, cls_token: bool = True, temperature: float = 10000.0
) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding of an ``h x w`` patch grid.

    Patch ``(row r, column c)`` (row-major, as ViTs flatten patches) gets
    ``[sin(r w_i), cos(r w_i), sin(c w_i), cos(c w_i)]`` with
    ``w_i = temperature ** (-i / (dim / 4))``, ``i < dim / 4``; on square grids this
    is MoCo v3's embedding. The class token's embedding is zero.

    Computed in float64 and returned in float32 whatever ``torch.get_default_dtype()``
    is (cast it with ``.to(dtype)`` for another precision).

    Args:
        h: grid rows.
        w: grid columns.
        dim: embedding size, divisible by 4.
        cls_token: prepend the class token's (zero) embedding.
        temperature: base of the frequencies (> 0; 10000 as the reference).

    Returns:
        ``(1, [1 +] h * w, dim)`` float32 tensor.

    Examples:
        >>> from momentum_contrast.vit import sincos_position_embedding
        >>> sincos_position_embedding(14, 14, 384).shape
        torch.Size([1, 197, 384])
    """
    h, w, dim = (
        check_positive_int("h", h),
        check_positive_int("w", w),
        check_positive_int("dim", dim),
    )
    if dim % 4:
        raise ValueError(f"dim must be divisible by 4 for a 2-D sin-cos embedding, got {dim}")
    t = check_positive("temperature", temperature)
    quarter = dim // 4
    omega = t ** (-torch.arange(quarter, dtype=torch.float64) / quarter)  # (D/4,)
    # patches row-major: patch p = r * w + c sits in row r and column c
    rows = repeat(torch.arange(h, dtype=torch.float64), "h -> (h w)", w=w)
    cols = repeat(torch.arange(w, dtype=torch.float64), "w -> (h w)", h=h)
    r, c = rows[:, None] * omega, cols[:, None] * omega  # (h*w, D/4)
    emb = torch.cat([r.sin(), r.cos(), c.sin(), c.cos()], dim=1).float()  # (h*w, D)
    if check_bool("cls_token", cls_token):
        emb = torch.cat([emb.new_zeros(1, dim), emb])  # float32, not the default dtype
    return emb[None]


def use_sincos_position_embedding(vit: nn.Module) -> nn.Module:
    """Replace a ViT's learned position embedding by the fixed sin-cos one (frozen).

    Modifies ``vit`` in place: call it before building the
    [`MomentumEncoder`][momentum_contrast.encoder.MomentumEncoder], as
    [`freeze_patch_embedding`][].

    Examples:
        >>> import torchvision
        >>> from momentum_contrast.vit import use_sincos_position_embedding
        >>> vit = use_sincos_position_embedding(torchvision.models.vit_b_16())
        >>> vit.encoder.pos_embedding.requires_grad
        False
    """
    encoder = getattr(vit, "encoder", None)
    pos = getattr(encoder, "pos_embedding", None)  # torchvision
    if isinstance(pos, torch.Tensor):
        side = int(getattr(vit, "image_size")) // int(getattr(vit, "patch_size"))  # noqa: B009
        grid = (side, side)
    else:
        pos = getattr(vit, "pos_embed", None)  # timm
        size = getattr(getattr(vit, "patch_embed", None), "grid_size", None)
        if not isinstance(pos, torch.Tensor) or size is None:
            raise TypeError(
                "vit must be a torchvision VisionTransformer (encoder.pos_embedding) or a "
                f"timm ViT (pos_embed, patch_embed.grid_size), got {type(vit).__name__}"
            )
        grid = (int(size[0]), int(size[1]))
    prefix = pos.shape[1] - grid[0] * grid[1] if pos.dim() == 3 else -1
    if prefix < 0 or pos.shape[0] != 1:  # e.g. timm's SAM ViT: (1, h, w, dim)
        raise TypeError(
            f"vit's position embedding must be (1, [tokens +] h * w, dim) for its {grid[0]} x "
            f"{grid[1]} patch grid, got shape {tuple(pos.shape)} ({type(vit).__name__})"
        )
    emb = sincos_position_embedding(grid[0], grid[1], pos.shape[2], cls_token=False)
    with torch.no_grad():
        pos[:, :prefix].zero_()
        pos[:, prefix:].copy_(emb.to(pos.dtype))
    pos.requires_grad_(False)
    return vit
