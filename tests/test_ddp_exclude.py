"""``exclude_from_ddp``: DDP leaves MoCo's own state alone (1 process and 2 gloo ranks)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _dist_ddp import (
    MoCoV2Small,
    scenario_default,
    scenario_excluded,
    scenario_excluded_bf16_unseeded,
    scenario_key_written_before_first_update,
)
from _dist_workers import destroy_in_process, launch
from torch import nn

from momentum_contrast import KeyQueue
from momentum_contrast.distributed import exclude_from_ddp


def test_names_are_the_queue_and_the_key_buffers() -> None:
    model = MoCoV2Small(ema_dtype=torch.float32)
    names = exclude_from_ddp(model)
    want = {f"queue.{n}" for n in ("keys", "ptr", "length")}
    want |= {f"key.key_encoder.1.{n}" for n in ("running_mean", "running_var")}
    want |= {"key.key_encoder.1.num_batches_tracked"}
    assert set(names) == want
    # what DDP reads, also through a torch.compile of the module
    assert set(model._ddp_params_and_buffers_to_ignore) == want | {f"_orig_mod.{n}" for n in want}
    online = {n for n, _ in model.online.named_buffers(prefix="online")}
    assert not online & set(names)  # the online model's statistics are still broadcast


def test_names_already_set_are_kept_and_repeats_are_harmless() -> None:
    model = MoCoV2Small()
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, ["online.0.bias"]
    )
    exclude_from_ddp(model)
    exclude_from_ddp(model)
    ignored = model._ddp_params_and_buffers_to_ignore
    assert ignored[0] == "online.0.bias" and len(ignored) == len(set(ignored)) == 13


def test_bad_modules_are_refused() -> None:
    with pytest.raises(TypeError, match=r"module must be an nn\.Module, got int"):
        exclude_from_ddp(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="holds no KeyQueue or MomentumEncoder"):
        exclude_from_ddp(nn.Linear(2, 2))
    holder = nn.Module()
    holder.queue = KeyQueue(size=8, dim=4)
    assert exclude_from_ddp(holder) == ["queue.keys", "queue.ptr", "queue.length"]


def test_too_late_once_wrapped(tmp_path: Path) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1
    )
    try:
        ddp = nn.parallel.DistributedDataParallel(MoCoV2Small())
        with pytest.raises(TypeError, match="wrapped in DistributedDataParallel already"):
            exclude_from_ddp(ddp)
    finally:
        destroy_in_process()


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_two_ranks_without_the_broadcast(tmp_path: Path) -> None:
    (tmp_path / "default").mkdir()
    (tmp_path / "excluded").mkdir()
    (default0, default1) = launch(scenario_default, 2, tmp_path / "default")
    (ex0, ex1) = launch(scenario_excluded, 2, tmp_path / "excluded")
    # DDP's default puts rank 0's queue and key-encoder statistics on rank 1 at every
    # forward; with exclude_from_ddp it touches neither, on any rank
    assert default1["queue_overwritten"] and default1["key_bn_overwritten"]
    for r in (ex0, ex1):
        assert not r["queue_overwritten"] and not r["key_bn_overwritten"]
    # every rank's queue is the same without the broadcast, and equals the default run's
    assert torch.equal(ex0["queue"], ex1["queue"])
    assert torch.equal(ex0["queue"], default0["queue"])
    # the training is unchanged: the same online and key weights as with the broadcast
    for r in (ex0, ex1, default1):
        assert _same(r["online"], default0["online"]) and _same(r["key"], default0["key"])
    # each rank keeps its own key-encoder statistics (its own batches differ)
    assert not torch.equal(ex0["key_bn"], ex1["key_bn"])
    assert torch.equal(ex0["key_bn"], default0["key_bn"])  # rank 0's are what they were


def test_two_ranks_bf16_copies_agree_when_ranks_start_apart(tmp_path: Path) -> None:
    r0, r1 = launch(scenario_excluded_bf16_unseeded, 2, tmp_path)
    # each rank built its model from another seed; DDP made the weights rank 0's and
    # exclude_from_ddp the float32 copies, so the averages agree to the last bit
    assert _same(r0["copies"], r1["copies"])
    assert _same(r0["key"], r1["key"]) and _same(r0["online"], r1["online"])
    assert all(c.dtype == torch.float32 for c in r0["copies"].values())
    assert torch.equal(r0["queue"], r1["queue"])


def test_two_ranks_key_weights_written_before_the_first_update_are_kept(tmp_path: Path) -> None:
    for r in launch(scenario_key_written_before_first_update, 2, tmp_path):
        assert torch.equal(r["key"]["0.weight"], torch.full((8, 6), 0.25))
        assert torch.equal(r["key"]["0.bias"], torch.full((8,), 0.5))


def test_exclusions_reach_ddp_through_a_later_torch_compile(tmp_path: Path) -> None:
    model = MoCoV2Small()
    names = exclude_from_ddp(model)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1
    )
    try:
        ddp = nn.parallel.DistributedDataParallel(torch.compile(model))
        ignored = ddp.parameters_to_ignore
        assert {f"_orig_mod.{n}" for n in names} <= ignored
        kept = {id(b) for b in ddp.modules_buffers}
        assert id(model.queue.keys) not in kept and id(model.online[1].running_mean) in kept
    finally:
        destroy_in_process()
