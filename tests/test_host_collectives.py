"""Host (gloo) all-gathers per step, counted by wrapping ``_collectives.all_gather_host`` on 2 and 3
ranks: one per MoCo v2 step (batch_shuffle; its batch_unshuffle and the queue push reuse
what it exchanged), one per v3 loss, none under ``assume_equal_batches``, with the same
results, unequal batches still gathered correctly, and broken promises raising."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _dist_scaling import QUEUE, initial_queue, scenario_host_collectives
from _dist_workers import global_tensor, launch

import momentum_contrast._collectives as collectives
import momentum_contrast.distributed as mcd

# one pytest-xdist worker runs this file (--dist loadgroup): its module fixtures run once
pytestmark = pytest.mark.xdist_group("host_collectives")


@pytest.fixture(scope="module", params=[2, 3], ids=["world2", "world3"])
def ranks(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> list[Any]:
    return launch(scenario_host_collectives, request.param, tmp_path_factory.mktemp("host"))


def test_one_host_exchange_per_step_and_none_when_batches_are_promised_equal(
    ranks: list[Any],
) -> None:
    per_step = {"batch_shuffle": 1, "batch_unshuffle": 0, "push": 0, "v3_loss": 1}
    for result in ranks:  # three steps each (before: 1, 1, 1 and 2 per step)
        assert result["default_counts"] == {k: 3 * v for k, v in per_step.items()}
        assert result["unequal_counts"] == {k: 3 * v for k, v in per_step.items()}
        assert result["assume_counts"] == dict.fromkeys(per_step, 0)


def test_results_do_not_depend_on_the_exchange(ranks: list[Any]) -> None:
    for r, result in enumerate(ranks):
        for mode in ("default", "assume", "unequal"):
            for step in range(3):  # Shuffle-BN round trip: each rank's own rows back
                got, expected = result[f"{mode}_k{step}"], result[f"{mode}_expected{step}"]
                assert got.shape[0] == (5 + r if mode == "unequal" else 5)
                torch.testing.assert_close(got, expected, rtol=0, atol=1e-15)
            assert torch.equal(result[f"{mode}_queue"], ranks[0][f"{mode}_queue"])
        assert torch.equal(result["assume_losses"], result["default_losses"])
        assert torch.equal(result["assume_queue"], result["default_queue"])
    # the pushes skipped their exchange and gather: the queue still holds every rank's
    # keys in rank order, as pushing the expected keys of all ranks one step at a time
    queue = ranks[0]["unequal_queue"].clone()
    reference = initial_queue()
    row = 0
    for step in range(3):
        for result in ranks:
            for key in result[f"unequal_expected{step}"]:
                reference[row % QUEUE] = key / key.norm()
                row += 1
    torch.testing.assert_close(queue, reference, rtol=0, atol=1e-15)


def test_broken_promises_raise_on_every_rank(ranks: list[Any]) -> None:
    for r, result in enumerate(ranks):
        if r > 1:  # ranks 2+ pass rank 1's layout: the mismatch is between ranks 0 and 1
            continue
        assert "number of rows (assume_equal_batches)" in result["broken_shape"]
        assert f"this is rank {r}" in result["broken_shape"]
        assert "same trailing shape and dtype" in result["broken_dtype"]
        assert "same trailing shape and dtype" in result["broken_unshuffle"]
        if r == 1:
            assert (
                "x must have 4 rows on rank 1 (as at batch_shuffle), got (3, 3)"
                in (result["broken_rows"])
            )
        else:
            assert "as many rows as it passed to batch_shuffle" in result["broken_rows"]
        assert torch.equal(result["after"], torch.arange(float(len(ranks)))[:, None].repeat(1, 2))


def test_assume_equal_batches_is_a_scoped_setting() -> None:
    assert not collectives.EQUAL_BATCHES.get()
    with pytest.raises(RuntimeError), mcd.assume_equal_batches():
        assert collectives.EQUAL_BATCHES.get()
        raise RuntimeError
    assert not collectives.EQUAL_BATCHES.get()
    x = global_tensor(1, 4, 3)
    with mcd.assume_equal_batches():
        assert torch.equal(mcd.concat_all_gather(x), x)  # single process: unchanged


def test_assume_equal_batches_belongs_to_its_own_thread() -> None:
    import threading

    seen: list[bool] = []
    inside, done = threading.Event(), threading.Event()

    def other() -> None:
        inside.wait()
        seen.append(collectives.EQUAL_BATCHES.get())  # another thread's gathers
        done.set()

    thread = threading.Thread(target=other)
    thread.start()
    with mcd.assume_equal_batches():
        inside.set()
        done.wait()
    thread.join()
    assert seen == [False]
