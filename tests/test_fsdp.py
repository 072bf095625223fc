"""FSDP2 (``fully_shard``) on the online model and on the key encoder, 2 gloo ranks on the
CPU, float64: five MoCo v3 steps of a small ViT-like model equal the single-process run
with the same global batch (losses and final key weights), with the default settings
(the root stays unsharded after the key encoder's no-grad forward: ``update`` must
reshard it) and with ``reshard_after_forward=True``; one side sharded alone raises."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _dist_recipes import TinyViT
from _dist_workers import fully_shard, global_tensor, launch
from _torch_version import FSDP2_TORCH, torch_at_least
from torch import nn

from momentum_contrast import MomentumEncoder, symmetric_contrastive_loss
from momentum_contrast.distributed import rank, world_size

pytest.importorskip("torch.distributed.fsdp")
pytestmark = [
    pytest.mark.xdist_group("fsdp"),  # module fixtures run once under pytest-xdist
    pytest.mark.skipif(
        not torch_at_least(FSDP2_TORCH), reason=f"FSDP2 on the CPU needs torch>={FSDP2_TORCH}"
    ),
]
STEPS, BATCH, TOKENS = 5, 4, 4  # per rank


def shard(model: nn.Module, **kwargs: Any) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world_size(),))
    for block in model.blocks:  # type: ignore[union-attr]
        fully_shard(block, mesh=mesh, **kwargs)
    fully_shard(model, mesh=mesh, **kwargs)


def train(mode: str) -> dict[str, Any]:
    """``mode``: "single" (no sharding; all ranks' data), "default" or "reshard"."""
    torch.manual_seed(0)
    model = TinyViT().double()
    key_encoder = MomentumEncoder(model, momentum=0.9)
    if mode != "single":
        kwargs = {"reshard_after_forward": True} if mode == "reshard" else {}
        shard(model, **kwargs)
        shard(key_encoder.key_encoder, **kwargs)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for step in range(STEPS):
        views = global_tensor(60 + step, 2, 2 * BATCH, TOKENS, 12)
        if mode != "single":
            views = views[:, rank() * BATCH : (rank() + 1) * BATCH]
        k1, k2 = key_encoder(views[0]), key_encoder(views[1])
        loss = symmetric_contrastive_loss(model(views[0]), model(views[1]), k1, k2, temperature=0.5)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        key_encoder.update()
        losses.append(loss.detach())
    keys = {}
    for name, p in key_encoder.key_encoder.named_parameters():
        keys[name] = p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone()
    return {"losses": torch.stack(losses), "keys": keys}


def scenario_fsdp() -> dict[str, Any]:
    out: dict[str, Any] = {mode: train(mode) for mode in ("default", "reshard")}
    torch.manual_seed(0)
    online = TinyViT().double()
    half = MomentumEncoder(online)
    shard(half.key_encoder)  # the key encoder sharded, the online model not
    try:
        half.update()
        out["one_side"] = "no error"
    except ValueError as e:
        out["one_side"] = str(e)
    return out


@pytest.fixture(scope="session")  # once per worker, even when other files run in between
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[Any]:
    return launch(scenario_fsdp, 2, tmp_path_factory.mktemp("fsdp"))


@pytest.mark.parametrize("mode", ["default", "reshard"])
def test_fsdp2_moco_v3_steps_equal_the_single_process_run(ranks: list[Any], mode: str) -> None:
    single = train("single")  # here, without a process group: the global batch at once
    # each rank's loss is the mean over its rows: their mean is the global batch's loss
    mean_loss = torch.stack([r[mode]["losses"] for r in ranks]).mean(0)
    torch.testing.assert_close(mean_loss, single["losses"], rtol=0, atol=1e-10)
    for r in ranks:
        for name, value in single["keys"].items():
            torch.testing.assert_close(r[mode]["keys"][name], value, rtol=0, atol=1e-10)
    torch.manual_seed(0)
    initial = TinyViT().double().head.weight.detach()
    moved = (single["keys"]["head.weight"] - initial).abs().max()
    assert moved > 1e-3  # the run did train and average


def test_one_side_sharded_raises(ranks: list[Any]) -> None:
    for r in ranks:
        assert "layout" in r["one_side"], r["one_side"]
        assert "a plain (unsharded) tensor" in r["one_side"] and "DTensor" in r["one_side"]
