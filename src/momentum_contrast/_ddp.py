"""Keep DistributedDataParallel's per-forward broadcast off MoCo's own state (private;
exported by :mod:`momentum_contrast.distributed`)."""

from __future__ import annotations

from torch import nn


def exclude_from_ddp(module: nn.Module) -> list[str]:
    """Tell DDP to leave the queue and the key encoder's buffers alone.

    ``DistributedDataParallel`` (with ``broadcast_buffers=True``, its default, which
    PyTorch Lightning and Hugging Face Accelerate keep) copies every buffer of the module
    it wraps from rank 0 at every forward. With MoCo's pieces inside that module (the
    layout of a LightningModule, of a container given to ``accelerator.prepare()``, and of
    the authors' code) that is a [`KeyQueue`][momentum_contrast.KeyQueue] (32 MiB at
    65,536 x 128) and the key encoder's BatchNorm statistics at every step. The queue is
    already the same on every rank (its random start is drawn alike everywhere, and it
    gathers before it writes), so that copy is pure cost; and it replaces each rank's key-encoder
    statistics with rank 0's. After this call DDP skips those buffers: at construction and
    at every forward. The online model's buffers are broadcast as before, and the key
    encoder's parameters are still made rank 0's once, when DDP is built.

    Call it on the very module given to DDP, or on the module that DDP gets through
    ``torch.compile``, before wrapping: in a LightningModule's ``__init__`` or ``setup()``,
    or on the container before ``accelerator.prepare()``. Called on a submodule, it changes
    nothing: DDP looks the names up from the module it wraps.

    Args:
        module: the module DDP will wrap, holding ``KeyQueue`` and/or
            ``MomentumEncoder`` submodules (at any depth).

    Returns:
        The names DDP now ignores (added to any already set on ``module``).

    Raises:
        TypeError: ``module`` is not an ``nn.Module``, or is wrapped in DDP already (too
            late: DDP reads the names when it is built).
        ValueError: ``module`` holds neither a ``KeyQueue`` nor a ``MomentumEncoder``.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from momentum_contrast import KeyQueue, MomentumEncoder
        >>> from momentum_contrast.distributed import exclude_from_ddp
        >>> model = nn.Module()
        >>> model.online = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8))
        >>> model.key = MomentumEncoder(model.online)
        >>> model.queue = KeyQueue(size=64, dim=8)
        >>> for name in exclude_from_ddp(model):
        ...     print(name)
        key.key_encoder.1.running_mean
        key.key_encoder.1.running_var
        key.key_encoder.1.num_batches_tracked
        queue.keys
        queue.ptr
        queue.length
    """
    from momentum_contrast.encoder import MomentumEncoder
    from momentum_contrast.queue import KeyQueue

    if isinstance(module, nn.parallel.DistributedDataParallel):
        raise TypeError(
            "exclude_from_ddp: module is wrapped in DistributedDataParallel already; call it "
            "on the module before wrapping it (DDP reads the names when it is built)"
        )
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    mine = (KeyQueue, MomentumEncoder)
    held = [(prefix, sub) for prefix, sub in module.named_modules() if isinstance(sub, mine)]
    if not held:
        raise ValueError(
            f"exclude_from_ddp: {type(module).__name__} holds no KeyQueue or MomentumEncoder "
            "(call it on the module DDP will wrap, which holds them)"
        )
    names = [name for prefix, sub in held for name, _ in sub.named_buffers(prefix=prefix)]
    before = list(getattr(module, "_ddp_params_and_buffers_to_ignore", []))
    # DDP of a torch.compile of ``module`` reads these names through ``_orig_mod.``
    ignored = before + [n for n in names + [f"_orig_mod.{n}" for n in names] if n not in before]
    ddp = nn.parallel.DistributedDataParallel
    ddp._set_params_and_buffers_to_ignore_for_model(module, ignored)  # type: ignore[no-untyped-call]
    return names
