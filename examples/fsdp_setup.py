"""``moco_v3.py --fsdp``: FSDP2 sharding of the ViT encoders, and full (unsharded)
checkpoints of the sharded model, key encoder and optimizer.

Each transformer block of the online model (backbone, projector and predictor under one
root) and of the key encoder is its own ``fully_shard`` unit on a 1-D mesh over all
ranks, then each root. On CUDA the blocks compute in bfloat16 and reduce gradients in
float32 (``MixedPrecisionPolicy``); the weights, the optimizer state and the key
encoder's moving average stay float32. On the CPU everything is float32.

Checkpoints hold full state dicts gathered to rank 0, in the same form as the replicated
(DDP or single-process) run's: the same parameter names, and the optimizer state keyed by
the parameters' positions in the optimizer, so a checkpoint moves between ``--fsdp`` and
not, and between any numbers of processes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from checkpoints import strip_module_prefix
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torchvision.models.vision_transformer import EncoderBlock

SAVE = StateDictOptions(full_state_dict=True, cpu_offload=True)  # rank 0 gets it all
LOAD = StateDictOptions(full_state_dict=True)  # every rank read the whole checkpoint


def shard(models: list[nn.Module], device: torch.device, world: int) -> None:
    """``fully_shard`` every ViT block of each model, then the model itself."""
    mesh = init_device_mesh(device.type, (world,))
    policy = MixedPrecisionPolicy()  # float32 on the CPU
    if device.type == "cuda":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for model in models:
        blocks = [m for m in model.modules() if isinstance(m, EncoderBlock)]
        if not blocks:
            raise ValueError(f"--fsdp: no ViT block in {type(model).__name__}")
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)


class FullModelState:
    """``state_dict`` / ``load_state_dict`` of a module holding FSDP2 modules, as full
    tensors: gathered to rank 0 on the CPU (a collective; other ranks get ``{}``), and
    loaded from a full state dict present on every rank."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def state_dict(self) -> dict[str, Any]:
        return dict(get_model_state_dict(self.module, options=SAVE))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_model_state_dict(self.module, strip_module_prefix(state), options=LOAD)


class FullOptimizerState:
    """The optimizer's full state, keyed as ``Optimizer.state_dict`` keys it (by position),
    so that a replicated run loads it, and it loads a replicated run's."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer
        name_of = {id(p): n for n, p in model.named_parameters()}
        self.names = [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]

    def state_dict(self) -> dict[str, Any]:
        full = get_optimizer_state_dict(self.model, self.optimizer, options=SAVE)
        if not full:  # ranks other than 0
            return {}
        index = {name: i for i, name in enumerate(self.names)}
        groups = [{**g, "params": [index[n] for n in g["params"]]} for g in full["param_groups"]]
        return {"state": {index[n]: v for n, v in full["state"].items()}, "param_groups": groups}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        groups = [
            {**g, "params": [self.names[i] for i in g["params"]]} for g in state["param_groups"]
        ]
        by_name = {"state": {self.names[i]: v for i, v in state["state"].items()}}
        set_optimizer_state_dict(
            self.model, self.optimizer, {**by_name, "param_groups": groups}, options=LOAD
        )


def gathered_features(root: nn.Module, features: nn.Module, rank: int) -> Callable[[], nn.Module]:
    """For the kNN monitor: a collective that returns, on rank 0, an unsharded copy of
    ``features`` (a submodule of the FSDP2 ``root``, taken before sharding) holding the
    current weights. A sharded submodule cannot run alone: its root owns some of its
    weights, and FSDP2 requires every forward to start at the root."""
    prefix = next(f"{n}." for n, m in root.named_modules() if m is features)
    replica = copy.deepcopy(features) if rank == 0 else None

    def current() -> nn.Module:
        state = get_model_state_dict(root, options=SAVE)  # every rank takes part
        if replica is None:
            return features  # not used off rank 0
        own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        replica.load_state_dict(own)
        return replica

    return current
