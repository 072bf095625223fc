"""``--accumulate N`` in the pre-training scripts: the scripts' own training steps (built by
``moco_v2.build`` / ``moco_v3.build``, one process, float32) with 2 micro-batches equal the
step of the whole batch, where accumulation is exact.

* MoCo v2 with ``--arch vit_tiny``: LayerNorm only, in both encoders and the head, so a
  sample's output does not depend on its batch. Two steps: the second scores against the
  queue pushed by the first and uses the key encoder updated once per step.
* MoCo v3 with ``--arch vit_tiny``: the projector and the predictor hold BatchNorm1d, whose
  statistics over a micro-batch are not those of the batch (not exact: see
  docs/guides/scaling-out.md). The comparison puts the online model's BatchNorms in eval
  mode (the step never switches modes), so only the keys of the whole batch (computed by
  the key encoder in training mode, over the whole batch either way), ``positive_offset``
  and the 1/N scaling are compared. With LARS: AdamW's first step divides each gradient by
  its own magnitude, which turns float32 rounding in near-zero gradients into updates of
  the full learning rate, so the weights of two exact runs would differ by about lr.
* The wiring, counted: one key-encoder update and one queue push per step (the keys of
  the micro-batches concatenated in order), and v3's offsets 0, N/2.
"""

from __future__ import annotations

import argparse
from typing import Any

import pytest
import torch
from example_runner import TINY, V12, import_examples

import_examples()
import moco_v2  # noqa: E402
import moco_v3  # noqa: E402

CPU = (torch.device("cpu"), 0, 1)
BATCH = 8


def args_for(script: Any, flags: list[str], accumulate: int) -> argparse.Namespace:
    argv = [*flags, "--arch", "vit_tiny", "--batch-size", str(BATCH)]
    return script.parse_args([*argv, "--accumulate", str(accumulate)])


def views(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, 3, 32, 32, generator=g), torch.randn(BATCH, 3, 32, 32, generator=g)


def v2_run(accumulate: int) -> dict[str, Any]:
    torch.manual_seed(0)
    args = args_for(moco_v2, V12, accumulate)
    stateful, step, *_ = moco_v2.build(args, "v2", CPU)
    losses = [step(*views(10 + i), 0.25)["loss"] for i in range(2)]
    return {"losses": torch.stack(losses), **stateful}


V3 = [*TINY, "--mlp-dim", "64", "--dim", "32", "--optimizer", "lars", "--lr", "0.5"]


def v3_run(accumulate: int) -> dict[str, Any]:
    torch.manual_seed(0)
    args = args_for(moco_v3, V3, accumulate)
    stateful, step, *_ = moco_v3.build(args, CPU)
    for module in stateful["model"].modules():  # the online model only: keys stay in training
        if isinstance(module, torch.nn.BatchNorm1d):
            module.eval()
    losses = [step(*views(20 + i), 0.5)["loss"] for i in range(2)]
    return {"losses": torch.stack(losses), **stateful}


def assert_same_state(one: torch.nn.Module, two: torch.nn.Module, atol: float) -> None:
    for (name, a), b in zip(one.state_dict().items(), two.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=atol, msg=name)


def test_v2_accumulated_steps_equal_the_full_batch_steps() -> None:
    full, micro = v2_run(1), v2_run(2)
    torch.testing.assert_close(micro["losses"], full["losses"], rtol=0, atol=1e-6)
    assert_same_state(full["model"], micro["model"], atol=2e-6)
    assert_same_state(full["key_encoder"], micro["key_encoder"], atol=2e-6)
    torch.testing.assert_close(micro["queue"].keys, full["queue"].keys, rtol=0, atol=2e-6)
    assert int(micro["queue"].ptr) == int(full["queue"].ptr) == 2 * BATCH
    torch.manual_seed(0)
    initial, *_ = moco_v2.build(args_for(moco_v2, V12, 1), "v2", CPU)
    moved = [
        (a - b).abs().max()
        for a, b in zip(initial["model"].parameters(), full["model"].parameters(), strict=True)
    ]
    assert max(moved) > 1e-3  # the steps did train: the comparison is not of idle weights


def test_v3_accumulated_steps_equal_the_full_batch_steps() -> None:
    full, micro = v3_run(1), v3_run(2)
    torch.testing.assert_close(micro["losses"], full["losses"], rtol=0, atol=1e-6)
    assert_same_state(full["model"], micro["model"], atol=2e-6)
    assert_same_state(full["key_encoder"], micro["key_encoder"], atol=2e-6)
    torch.manual_seed(0)
    initial, *_ = moco_v3.build(args_for(moco_v3, V3, 1), CPU)
    moved = [
        (a - b).abs().max()
        for a, b in zip(initial["model"].parameters(), full["model"].parameters(), strict=True)
    ]
    assert max(moved) > 1e-2


def test_v3_micro_batches_would_differ_with_training_batchnorm() -> None:
    """The exact comparison above needs the BatchNorms fixed: in training mode they
    normalise each micro-batch by its own statistics, and the losses differ."""
    results = []
    for accumulate in (1, 2):
        torch.manual_seed(0)
        _, step, *_ = moco_v3.build(args_for(moco_v3, V3, accumulate), CPU)
        results.append(step(*views(20), 0.5)["loss"])
    assert (results[0] - results[1]).abs() > 1e-4


class Spy:
    """Counts calls of a function and records their keyword arguments."""

    def __init__(self, fn: Any) -> None:
        self.fn, self.calls = fn, []  # type: ignore[var-annotated]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append((args, kwargs))
        return self.fn(*args, **kwargs)


@pytest.mark.parametrize("accumulate", [1, 2, 4])
def test_one_update_and_one_push_per_step(accumulate: int) -> None:
    torch.manual_seed(0)
    stateful, step, *_ = moco_v2.build(args_for(moco_v2, V12, accumulate), "v2", CPU)
    update = Spy(stateful["key_encoder"].update)
    push = Spy(stateful["queue"].push)
    stateful["key_encoder"].update, stateful["queue"].push = update, push
    x_q, x_k = views(30)
    step(x_q, x_k, 0.0)
    assert len(update.calls) == 1 and len(push.calls) == 1
    (pushed,), _ = push.calls[0]
    # the keys of the whole batch, in its order (LayerNorm: a key depends on its image only)
    torch.testing.assert_close(pushed, stateful["key_encoder"](x_k), rtol=0, atol=1e-5)


@pytest.mark.parametrize("accumulate", [1, 2, 4])
def test_v3_scores_each_micro_batch_against_all_keys(
    accumulate: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    args = args_for(moco_v3, V3, accumulate)
    stateful, step, *_ = moco_v3.build(args, CPU)
    loss = Spy(moco_v3.symmetric_contrastive_loss)
    monkeypatch.setattr(moco_v3, "symmetric_contrastive_loss", loss)
    update = Spy(stateful["key_encoder"].update)
    stateful["key_encoder"].update = update
    step(*views(31), 0.5)
    assert len(update.calls) == 1
    size = BATCH // accumulate
    assert [kw["positive_offset"] for _, kw in loss.calls] == list(range(0, BATCH, size))
    for (q1, _, k1, k2), _ in loss.calls:
        assert q1.shape[0] == size and k1.shape[0] == k2.shape[0] == BATCH


@pytest.mark.parametrize("arch", ["vit_tiny", "small_cnn"])
def test_v2_random_stream_does_not_depend_on_accumulate(arch: str) -> None:
    """Shuffle-BN's permutations come from their own generator, reseeded once per step: the
    global generator is left in the same state for every N, so every later step's
    augmentations are the same, while each micro-batch still gets a random permutation."""
    after, augmented = [], []
    for accumulate in (1, 2, 4):
        torch.manual_seed(0)
        flags = [*V12, "--arch", arch, "--batch-size", str(BATCH)]
        args = moco_v2.parse_args([*flags, "--accumulate", str(accumulate)])
        _, step, augment, _ = moco_v2.build(args, "v2", CPU)
        torch.manual_seed(1)
        step(*views(40), 0.0)
        after.append(torch.get_rng_state())
        images = torch.randint(0, 256, (4, 3, 40, 40), dtype=torch.uint8)
        augmented.append(augment(images))  # the next step's views, from the global stream
    assert torch.equal(after[0], after[1]) and torch.equal(after[0], after[2])
    for one, two in augmented[1:]:
        assert torch.equal(one, augmented[0][0]) and torch.equal(two, augmented[0][1])


def test_v2_micro_batches_are_shuffled_with_their_own_permutations(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real, calls = moco_v2.batch_shuffle, []

    def spy(x: torch.Tensor, generator: torch.Generator | None = None) -> Any:
        shuffled, idx = real(x, generator)
        calls.append((x, generator, shuffled))
        return shuffled, idx

    monkeypatch.setattr(moco_v2, "batch_shuffle", spy)
    torch.manual_seed(0)
    _, step, *_ = moco_v2.build(args_for(moco_v2, V12, 2), "v2", CPU)
    for seed in (50, 51):
        step(*views(seed), 0.0)
    assert len(calls) == 4  # two micro-batches per step
    orders = []
    for x, generator, shuffled in calls:
        assert isinstance(generator, torch.Generator)  # its own, not the global one
        orders.append([int((x == row).all(dim=(1, 2, 3)).nonzero()) for row in shuffled])
    assert all(sorted(order) == [0, 1, 2, 3] for order in orders)  # within the micro-batch
    assert len({tuple(order) for order in orders}) > 1  # drawn afresh, not one fixed order
