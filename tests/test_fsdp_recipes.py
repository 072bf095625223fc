"""Whole MoCo recipes on 2 gloo ranks against one process computing the same thing
(float64; scenarios in ``_dist_recipes.py``).

* MoCo v3, TinyViT (LayerNorm only) under DDP: five steps equal the single-process run
  with the same global batch (losses, online and key weights).
* MoCo v2, SmallCNN (BatchNorm) with Shuffle-BN and a KeyQueue, both encoders under
  FSDP2. BatchNorm makes a sample's output depend on its batch, so the single process
  reproduces every rank's batches: the queries of each rank's rows, and the keys of each
  rank's shuffled rows (the permutation drawn from the same generator), each through the
  model alone, and the mean of the ranks' losses. Then the losses, the parameters of both
  encoders and the queue are equal. BatchNorm's running statistics are not compared: each
  rank keeps its own (FSDP2 does not shard or average buffers), which no single copy is.
* ``ema_dtype=torch.float32`` with a bfloat16 key encoder under FSDP2: the float32 shadow
  is a DTensor laid out like its key, and 20 updates equal the unsharded average.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _dist_recipes import STEPS, TinyViT, bf16_shadow, scenario_recipes, v2_fsdp, v3_ddp
from _dist_workers import launch
from _torch_version import FSDP2_TORCH, torch_at_least

pytest.importorskip("torch.distributed.fsdp")
pytestmark = [
    pytest.mark.xdist_group("fsdp_recipes"),  # module fixtures run once under pytest-xdist
    pytest.mark.skipif(
        not torch_at_least(FSDP2_TORCH), reason=f"FSDP2 on the CPU needs torch>={FSDP2_TORCH}"
    ),
]


@pytest.fixture(scope="session")  # once per worker, even when other files run in between
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[Any]:
    return launch(scenario_recipes, 2, tmp_path_factory.mktemp("recipes"))


def assert_same(
    got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float
) -> None:
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=atol, msg=name)


def test_moco_v3_under_ddp_equals_the_single_process_run(ranks: list[Any]) -> None:
    single = v3_ddp(single=True)
    mean_loss = torch.stack([r["v3_ddp"]["losses"] for r in ranks]).mean(0)
    assert mean_loss.shape == (STEPS,)
    torch.testing.assert_close(mean_loss, single["losses"], rtol=0, atol=1e-10)
    for r in ranks:
        assert_same(r["v3_ddp"]["online"], single["online"], atol=1e-10)
        assert_same(r["v3_ddp"]["keys"], single["keys"], atol=1e-10)
    assert (single["losses"][0] - single["losses"][-1]).abs() > 1e-3  # it trained


def test_moco_v2_under_fsdp2_with_batchnorm_equals_the_per_rank_batches(ranks: list[Any]) -> None:
    single = v2_fsdp(single=True)
    mean_loss = torch.stack([r["v2_fsdp"]["losses"] for r in ranks]).mean(0)
    torch.testing.assert_close(mean_loss, single["losses"], rtol=0, atol=1e-10)
    for r in ranks:
        assert r["v2_fsdp"]["sharded"] and not single["sharded"]
        assert_same(r["v2_fsdp"]["online"], single["online"], atol=1e-10)
        assert_same(r["v2_fsdp"]["keys"], single["keys"], atol=1e-10)
        torch.testing.assert_close(r["v2_fsdp"]["queue"], single["queue"], rtol=0, atol=1e-12)
    assert not torch.equal(ranks[0]["v2_fsdp"]["losses"], ranks[1]["v2_fsdp"]["losses"])


def test_float32_key_encoder_of_a_bfloat16_model_under_fsdp2(ranks: list[Any]) -> None:
    single = bf16_shadow(single=True)
    for r in ranks:
        got = r["bf16_shadow"]
        assert got["sharded"] and not single["sharded"]  # DTensors on the ranks
        assert_same(got["keys"], single["keys"], atol=0)
        assert_same(got["state"], single["state"], atol=0)  # saved in full
        torch.testing.assert_close(got["outputs"], single["outputs"], rtol=0, atol=0)
    for key in single["keys"].values():
        assert key.dtype == torch.float32
    assert single["outputs"].dtype == torch.float32  # .float() of bfloat16 keys
    torch.manual_seed(0)  # the average moved, where a bfloat16 average would stall
    initial = TinyViT().bfloat16().head.weight.float()
    assert (single["keys"]["head.weight"] - initial).abs().max() > 1e-3
