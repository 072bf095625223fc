"""MomentumEncoder refuses or warns where a training loop would go silently wrong: two
updates per optimizer step (gradient accumulation with a misplaced update) and FSDP1."""

from __future__ import annotations

import re
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import torch
import torch.distributed as dist
from _dist_workers import destroy_in_process
from _torch_version import FSDP2_TORCH, torch_at_least
from torch import nn

from momentum_contrast import MomentumEncoder

WARNING = r"update\(\) ran again with the online model unchanged"


def step_loop(opt_kind: str, accumulate: int, update_per_micro_batch: bool) -> int:
    """A small training loop; returns how many double-update warnings it raised."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    key_encoder = MomentumEncoder(model, momentum=0.9)
    if opt_kind == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    else:  # fused kernels leave the version counters alone
        opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):
            for _ in range(accumulate):
                x = torch.randn(16, 8)
                (model(x) - key_encoder(x)).pow(2).mean().backward()
                if update_per_micro_batch:
                    key_encoder.update()  # misplaced: on_train_batch_end under accumulation
            opt.step()
            opt.zero_grad()
            if not update_per_micro_batch:
                key_encoder.update()  # right: once per optimizer step
    return sum(
        issubclass(w.category, RuntimeWarning) and "ran again with the online" in str(w.message)
        for w in caught
    )


@pytest.mark.parametrize("opt_kind", ["sgd", "fused_adamw"])
def test_one_update_per_optimizer_step_never_warns(opt_kind: str) -> None:
    assert step_loop(opt_kind, accumulate=2, update_per_micro_batch=False) == 0


def test_an_update_per_micro_batch_warns_once() -> None:
    assert step_loop("sgd", accumulate=2, update_per_micro_batch=True) == 1
    assert step_loop("sgd", accumulate=1, update_per_micro_batch=True) == 0


def test_a_fused_optimizer_is_never_taken_for_a_missing_step() -> None:
    # a fused step moves no version counter and leaves DDP's bucket-view gradients where
    # they were: nothing on the host tells it from no step, so nothing is said
    assert step_loop("fused_adamw", accumulate=2, update_per_micro_batch=True) == 0
    assert step_loop("fused_adamw", accumulate=1, update_per_micro_batch=False) == 0


def test_each_warning_is_given_once_and_one_does_not_hide_the_other() -> None:
    online = nn.Linear(4, 4).bfloat16()
    enc = MomentumEncoder(online)
    with pytest.warns(RuntimeWarning, match="too coarse"):
        enc.update()
    for _ in range(2):  # two steps: the counters move (a reload would move them once)
        with torch.no_grad():
            online.weight.add_(1.0)
        enc.update()
    with pytest.warns(RuntimeWarning, match=WARNING):
        enc.update()  # no step since the last update
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enc.update()  # once each


@pytest.mark.parametrize(
    "schedule, warned",  # s: an optimizer step, u: an update
    [
        ("susuu", False),  # an update after every step: from the third step on
        ("sususuu", True),
        ("uusuu", False),  # an update per micro-batch: in the third accumulation window
        ("uusuusuu", True),
        ("uuuusuuuu", False),
        ("uuuusuuuusuuuu", True),
    ],
)
def test_when_the_warning_starts(schedule: str, warned: bool) -> None:
    # as the docs say: the first update has nothing to compare with, and two updates must
    # have found a step since the one before
    online = nn.Linear(4, 4)
    enc = MomentumEncoder(online)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for event in schedule:
            if event == "s":
                with torch.no_grad():
                    online.weight.add_(1.0)
            else:
                enc.update()
    assert any(re.search(WARNING, str(w.message)) for w in caught) == warned


def test_an_in_place_write_of_the_online_model_counts_as_a_step() -> None:
    online = nn.Linear(4, 4)
    enc = MomentumEncoder(online)
    online(torch.randn(2, 4)).sum().backward()  # a misplaced update has gradients to see
    enc.update()
    for _ in range(2):
        with torch.no_grad():
            online.weight.add_(1.0)  # a hand-written optimizer step
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            enc.update()
    with pytest.warns(RuntimeWarning, match=WARNING):
        enc.update()


def test_a_reload_between_fused_steps_is_not_taken_for_a_step() -> None:
    # a fused step moves no counter; a reload of the online weights (a rollback) moves them
    # once: the fused steps after it must not look like missing ones
    online = nn.Linear(4, 4)
    saved = {k: v.clone() for k, v in online.state_dict().items()}
    enc = MomentumEncoder(online, momentum=0.5)
    enc.update()
    online.load_state_dict(saved)  # copy_: the counters move
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            online.weight.data.add_(1.0)  # as a fused optimizer: .data keeps no counter
            enc.update()
    key = cast(nn.Linear, enc.key_encoder)  # 0.5, 1.25, 2.125: averaged at every update
    torch.testing.assert_close(key.weight, saved["weight"] + 2.125, rtol=0, atol=1e-5)


@pytest.fixture
def process_group() -> Iterator[None]:
    with tempfile.TemporaryDirectory() as tmp:
        store = f"file://{Path(tmp) / 'store'}"
        dist.init_process_group("gloo", init_method=store, rank=0, world_size=1)
        try:
            yield
        finally:
            destroy_in_process()


@pytest.mark.parametrize("use_orig_params", [False, True])
@pytest.mark.filterwarnings("ignore:FSDP is switching to use `NO_SHARD`")
def test_fsdp1_is_refused_with_the_fsdp2_pointer(
    process_group: None, use_orig_params: bool
) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    wrapped = FullyShardedDataParallel(
        model, device_id=torch.device("cpu"), use_orig_params=use_orig_params
    )
    match = r"FSDP1 \(FullyShardedDataParallel\) is not supported: .*fully_shard.*fsdp_version=2"
    for given in (wrapped, model):  # the wrapper, or the model inside it (Lightning's)
        with pytest.raises(TypeError, match=match):
            MomentumEncoder(given)
    enc = MomentumEncoder(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)))
    with pytest.raises(TypeError, match=match):
        enc.online = wrapped
    later = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    enc = MomentumEncoder(later)  # a framework wraps the model after this
    FullyShardedDataParallel(later, device_id=torch.device("cpu"), use_orig_params=use_orig_params)
    with pytest.raises(TypeError, match=match):
        enc.update()


def test_another_optimizer_stepping_does_not_hide_a_misplaced_update() -> None:
    model = nn.Linear(8, 8)
    probe = nn.Linear(8, 2)  # an online linear probe, stepped every micro-batch
    probe_opt = torch.optim.SGD(probe.parameters(), lr=0.1)
    model_opt = torch.optim.SGD(model.parameters(), lr=0.1)
    key_encoder = MomentumEncoder(model, momentum=0.9)
    with pytest.warns(RuntimeWarning, match=WARNING):
        for micro_batch in range(6):  # the model steps every 2 micro-batches
            probe(model(torch.randn(4, 8))).sum().backward()  # the model accumulates
            probe_opt.step()
            if micro_batch % 2:
                model_opt.step()
                model_opt.zero_grad()
            key_encoder.update()  # per micro-batch: misplaced


def test_a_key_encoder_wrapped_in_fsdp1_is_named(process_group: None) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel

    enc = MomentumEncoder(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)))
    enc.key_encoder = FullyShardedDataParallel(enc.key_encoder, device_id=torch.device("cpu"))
    with pytest.raises(TypeError, match=r"FSDP1 \(FullyShardedDataParallel\) is not supported"):
        enc.update()


def test_an_encoder_built_after_fully_shard_says_to_build_it_first(process_group: None) -> None:
    from _dist_workers import fully_shard

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    fully_shard(model)
    with pytest.raises(TypeError, match=r"build the MomentumEncoder first, then fully_shard"):
        MomentumEncoder(model)


@pytest.mark.parametrize("use_orig_params", [False, True])
@pytest.mark.filterwarnings("ignore:FSDP is switching to use `NO_SHARD`")
def test_fsdp1_on_a_submodule_is_refused(process_group: None, use_orig_params: bool) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    model[0] = FullyShardedDataParallel(  # an auto-wrap policy wraps blocks, not the root
        model[0], device_id=torch.device("cpu"), use_orig_params=use_orig_params
    )
    whole = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    FullyShardedDataParallel(whole, device_id=torch.device("cpu"), use_orig_params=use_orig_params)
    for given in (model, whole[0]):  # a wrapped block; a block of a wrapped model
        with pytest.raises(TypeError, match=r"FSDP1 \(FullyShardedDataParallel\) is not supported"):
            MomentumEncoder(given)


@pytest.mark.skipif(
    not torch_at_least(FSDP2_TORCH), reason=f"FSDP2 on the CPU needs torch>={FSDP2_TORCH}"
)
def test_a_second_update_without_a_step_warns_under_fsdp2(process_group: None) -> None:
    from _dist_workers import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    key_encoder = MomentumEncoder(model, momentum=0.9)
    fully_shard(model)
    fully_shard(key_encoder.key_encoder)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one update per step: no warning
        for _ in range(3):
            model(torch.randn(4, 8)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            key_encoder.update()
    with pytest.warns(RuntimeWarning, match=WARNING):
        key_encoder.update()  # no step since the last one


@pytest.mark.skipif(  # torch 2.5's DTensor linear backward raises IndexError on the CPU
    not torch_at_least(FSDP2_TORCH), reason=f"DTensor training on the CPU: torch>={FSDP2_TORCH}"
)
def test_a_copy_of_tensor_parallel_weights_after_a_backward_holds_no_gradients(
    process_group: None,
) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_module, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    online = distribute_module(nn.Linear(4, 2), mesh)  # DTensor parameters
    online(distribute_tensor(torch.randn(3, 4), mesh)).to_local().sum().backward()
    enc = MomentumEncoder(online)  # a DTensor's deepcopy keeps .grad, a Parameter's does not
    before = [p.detach().clone() for p in enc.key_encoder.parameters()]
    both = nn.ModuleDict({"online": online, "key": enc})  # one optimizer over both, as the
    torch.optim.SGD(both.parameters(), lr=1.0).step()  # reference builds it: frozen keys stay
    assert all(p.grad is None for p in enc.key_encoder.parameters())
    for p, b in zip(enc.key_encoder.parameters(), before, strict=True):
        assert torch.equal(cast(Any, p).to_local(), cast(Any, b).to_local())  # DTensors
