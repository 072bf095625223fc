"""Distributed behaviour with real gloo process groups spawned on the CPU (2 and 3 ranks)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from _dist_workers import (
    QUEUE_PUSHES,
    VARIABLE_SIZES,
    global_tensor,
    launch,
    local_rows,
    scenario_core,
    scenario_ddp_moco_v2,
    scenario_encoder_after_ddp,
    scenario_gather_mismatch,
    scenario_queue_random_init,
)

from momentum_contrast import KeyQueue
from momentum_contrast.distributed import (
    batch_shuffle,
    batch_unshuffle,
    concat_all_gather,
    gather_sizes,
    is_distributed,
    rank,
    world_size,
)

# one pytest-xdist worker runs this file (--dist loadgroup): its module fixtures run once
pytestmark = pytest.mark.xdist_group("distributed")


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


def ctr_rows(q: torch.Tensor, k_all: torch.Tensor, targets: torch.Tensor, t: float) -> torch.Tensor:
    """Per-row MoCo v3 ctr, written from the paper: -log softmax(q·k_all / T)[target] * 2T."""
    logits = unit(q) @ unit(k_all).T / t
    picked = logits.gather(1, targets[:, None]).squeeze(1)
    return (torch.logsumexp(logits, dim=1) - picked) * 2 * t


@pytest.fixture(scope="module", params=[2, 3], ids=["world2", "world3"])
def core(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> list[Any]:
    return launch(scenario_core, request.param, tmp_path_factory.mktemp("core"))


def test_symmetric_loss_and_gradients_match_single_process(core: list[Any]) -> None:
    w, n, d, t = len(core), 4, 6, 0.2
    x1, x2 = global_tensor(1, w * n, d), global_tensor(2, w * n, d)
    k1, k2 = global_tensor(3, w * n, d), global_tensor(4, w * n, d)
    weight = global_tensor(5, d, d).requires_grad_()
    targets = torch.arange(w * n)
    q1, q2 = x1 @ weight, x2 @ weight
    single = ctr_rows(q1, k2, targets, t).mean() + ctr_rows(q2, k1, targets, t).mean()
    single.backward()
    losses = torch.stack([r["v3_loss"] for r in core])
    grads = torch.stack([r["v3_grad"] for r in core])
    # each rank's loss is the mean over its own rows: summed over ranks = world x single;
    # DistributedDataParallel averages gradients, so the mean gradient = single-process one
    torch.testing.assert_close(losses.sum(), w * single.detach(), rtol=0, atol=1e-10)
    torch.testing.assert_close(grads.sum(0), w * weight.grad, rtol=0, atol=1e-10)


def test_symmetric_loss_with_unequal_batches_offsets_targets(core: list[Any]) -> None:
    w, t = len(core), 0.5
    sizes = VARIABLE_SIZES[:w]
    total = sum(sizes)
    q1, q2 = global_tensor(6, total, 6), global_tensor(7, total, 6)
    k1, k2 = global_tensor(8, total, 6), global_tensor(9, total, 6)
    for r, result in enumerate(core):
        own = torch.arange(total)[sum(sizes[:r]) : sum(sizes[: r + 1])]
        expected = (
            ctr_rows(local_rows(q1, sizes, r), k2, own, t).mean()
            + ctr_rows(local_rows(q2, sizes, r), k1, own, t).mean()
        )
        torch.testing.assert_close(result["v3_var_loss"], expected, rtol=0, atol=1e-10)


def test_queues_are_identical_and_equal_single_process(core: list[Any]) -> None:
    w = len(core)
    reference = KeyQueue(13, 4, dtype=torch.float64)
    reference.keys.copy_(global_tensor(10, 13, 4))
    for step, per_rank in enumerate(QUEUE_PUSHES):
        reference.push(global_tensor(100 + step, sum(per_rank[:w]), 4))  # rank order
    for result in core:
        assert result["queue_len"] == 13
        for name, value in reference.state_dict().items():
            assert torch.equal(result["queue"][name], value), (result["rank"], name)


def test_gather_sizes_and_concat_all_gather(core: list[Any]) -> None:
    w = len(core)
    for result in core:
        assert result["sizes"] == [10 + r for r in range(w)]
        for label, sizes in (("equal", [8] * w), ("unequal", VARIABLE_SIZES[:w])):
            expected = torch.arange(float(sum(sizes)))[:, None].repeat(1, 2)
            assert torch.equal(result[f"gather_{label}"], expected)


@pytest.mark.parametrize("label", ["equal", "unequal"])
def test_batch_shuffle_round_trip_and_mixing(core: list[Any], label: str) -> None:
    w = len(core)
    sizes = [8] * w if label == "equal" else VARIABLE_SIZES[:w]
    idx = core[0][f"idx_{label}"]
    drawn = []
    for r, result in enumerate(core):
        assert torch.equal(result[f"idx_{label}"], idx)  # one permutation for all ranks
        assert torch.equal(result[f"restored_{label}"], result[f"expected_{label}"])
        shuffled = result[f"shuffled_{label}"][:, 0].long()
        assert len(shuffled) == sizes[r]  # every rank keeps its own batch size
        drawn.append(shuffled)
    everything = torch.cat(drawn)
    assert sorted(everything.tolist()) == list(range(sum(sizes)))  # a permutation
    assert torch.equal(torch.argsort(idx), everything)  # rank r holds perm[its slice]
    if label == "equal":
        owner = torch.repeat_interleave(torch.arange(w), torch.tensor(sizes))
        for r, rows in enumerate(drawn):
            assert (owner[rows] != r).any(), f"rank {r} drew only its own samples"


def test_ddp_moco_v2_steps_leave_identical_key_encoders_and_queues(tmp_path: Path) -> None:
    ranks = launch(scenario_ddp_moco_v2, 2, tmp_path)
    a, b = ranks
    assert torch.isfinite(a["losses"]).all() and torch.isfinite(b["losses"]).all()
    assert not torch.equal(a["losses"], b["losses"])  # the ranks did see different data
    for name, value in a["key_params"].items():
        assert torch.equal(value, b["key_params"][name]), name
        assert torch.equal(a["online_params"][name], b["online_params"][name]), name
    for name, value in a["queue"].items():
        assert torch.equal(value, b["queue"][name]), name
    assert int(a["queue"]["ptr"]) == 3 * 12 % 40  # both ranks' keys went in


def test_encoder_built_after_ddp_is_rank_0s_on_every_rank(tmp_path: Path) -> None:
    a, b = launch(scenario_encoder_after_ddp, 2, tmp_path)
    for name, value in a["after"].items():
        assert torch.equal(value, b["after"][name]), name
        assert torch.equal(a["online"][name], b["online"][name]), name
    # the guides' reason: a copy taken before DDP keeps each rank's own initial weights
    assert any(not torch.equal(v, b["before"][n]) for n, v in a["before"].items())


def test_single_process_helpers_are_correct_no_ops() -> None:
    assert not is_distributed() and rank() == 0 and world_size() == 1
    assert gather_sizes(7) == [7]
    x = torch.randn(5, 3, requires_grad=True)
    gathered = concat_all_gather(x)
    assert torch.equal(gathered, x) and not gathered.requires_grad
    g = torch.Generator().manual_seed(0)
    data = torch.arange(64.0)[:, None]
    shuffled, idx = batch_shuffle(data, generator=g)
    assert not torch.equal(shuffled, data)  # a real permutation, not a no-op
    assert sorted(shuffled[:, 0].tolist()) == data[:, 0].tolist()
    assert torch.equal(batch_unshuffle(shuffled**2, idx), data**2)
    with pytest.raises(ValueError, match=r"must have shape \(10,\).*x holding 10\), got \(64,\)"):
        batch_unshuffle(shuffled[:10], idx)
    with pytest.raises(TypeError, match=r"x must be a torch\.Tensor, got list"):
        batch_unshuffle(shuffled.tolist(), idx)  # type: ignore[arg-type]
    with pytest.raises(
        TypeError, match=r"generator must be a torch\.Generator or None, got builtins\.int"
    ):
        batch_shuffle(data, generator=123)  # type: ignore[arg-type]
    for op in (concat_all_gather, batch_shuffle):  # the same errors in every collective
        with pytest.raises(ValueError, match="x must have at least one dimension"):
            op(torch.tensor(1.0))
    with pytest.raises(TypeError, match="n must be an int, got float"):
        gather_sizes(3.7)  # type: ignore[arg-type]


def test_random_queue_is_the_same_on_every_rank_without_any_exchange(tmp_path: Path) -> None:
    a, b = launch(scenario_queue_random_init, 2, tmp_path)
    assert a["global_untouched"] and b["global_untouched"]
    assert torch.equal(a["negatives"], b["negatives"])  # other seeds, the same keys
    assert torch.equal(b["alone"], a["negatives"])  # no collective: rank 1 read them alone
    unit = torch.ones(32, dtype=a["negatives"].dtype)
    torch.testing.assert_close(a["negatives"].norm(dim=1), unit)  # random unit keys ...
    assert a["negatives"].std() > 0.1  # ... not a constant
    assert torch.equal(a["after_push"], b["after_push"])  # and after a push


def test_concat_all_gather_mismatch_raises_on_every_rank(tmp_path: Path) -> None:
    ranks = launch(scenario_gather_mismatch, 2, tmp_path)
    for r, result in enumerate(ranks):
        assert f"this is rank {r}" in result["shape"]
        assert "rank 0: (N, 4)" in result["shape"] and "rank 1: (N, 5)" in result["shape"]
        assert "rank 0: (N, 4) torch.float32; rank 1: (N, 4) torch.float64" in result["dtype"]
        assert "rank 1: (N, 2, 2)" in result["ndim"]
        assert torch.equal(result["after"], torch.tensor([[0.0] * 3] * 2 + [[1.0] * 3] * 2))
